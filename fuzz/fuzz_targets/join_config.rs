#![no_main]
// The body is bgworker::fuzzing::join_config, which stable tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bgworker::fuzzing::join_config(data));
