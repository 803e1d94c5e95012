#![no_main]
// The body is bgworker::fuzzing::jwt, which stable tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bgworker::fuzzing::jwt(data));
