#![no_main]
// The body is bgworker::fuzzing::handshake_query, which stable tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bgworker::fuzzing::handshake_query(data));
