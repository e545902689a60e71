#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stagehand_agent::fuzz::policy(data));
