#![no_main]
// The body is bgworker::fuzzing::frame, which stable tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bgworker::fuzzing::frame(data));
