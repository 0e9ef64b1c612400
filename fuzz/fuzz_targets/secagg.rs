#![no_main]
// The body: maeum_test_support::fuzz::secagg (test-support/src/fuzz.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| maeum_test_support::fuzz::secagg(data));
