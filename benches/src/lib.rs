//! Benchmarks of flow: criterion benches in `benches/benches/` and the
//! side-by-side comparison binary.
//!
//! Criterion benches (`cargo bench -p flow-benches --bench NAME`):
//! - `message`: encoding and decoding frames of `flow-message`;
//! - `cipher`: sealing and opening frames with AES-256-GCM and
//!   ChaCha20-Poly1305;
//! - `conn`: a connection end to end over the `memory` and `tcp` transports
//!   (throughput per write size, flow open/close, handshake);
//! - `transports`: raw framing through every `flow-protocols` transport.
//!
//! The `compare` binary runs flow beside yamux over Noise XX (the libp2p
//! stack), plain yamux, quinn and plain TCP. Its dependencies sit behind the
//! `compare` feature, off by default, so workspace builds and tests never
//! compile them:
//!
//! ```text
//! cargo run --release -p flow-benches --features compare --bin compare -- --help
//! ```
//!
//! Figures and how they were measured: `benches/RESULTS.md`.
