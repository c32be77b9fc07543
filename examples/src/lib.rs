//! Runnable examples of weft; see `embedded.rs` and `lan.rs` beside this crate.
