//! Benchmarks of flow: criterion benches in `benches/benches/` and the
//! side-by-side comparison binary.
