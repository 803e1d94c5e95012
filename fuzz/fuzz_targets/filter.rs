#![no_main]
// The body is bgworker::fuzzing::filter_and_values, which stable tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bgworker::fuzzing::filter_and_values(data));
