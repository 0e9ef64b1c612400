//! Maeum test support. `fuzz`: the bodies of the fuzz targets: every decoder that
//! reads bytes from the network or from a file someone else wrote. `fuzz/` runs them
//! under libFuzzer (`cargo +nightly fuzz run TARGET`), and this crate's tests run them
//! over the committed corpus (`fuzz/corpus/TARGET/`) on stable, so CI replays every seed
//! and every crash ever found. A body must never panic, whatever the bytes: errors are
//! the decoders' job.
#![forbid(unsafe_code)]

pub mod fuzz;
