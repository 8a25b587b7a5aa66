//! End-to-end tests of flow across crates live in `tests/tests/`.
