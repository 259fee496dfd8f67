//! `JobSpec::from_json` on arbitrary bytes: it never panics, and whatever parses serializes back
//! to JSON that parses to the same spec (the push API's body and the pull lease are this type).
#![no_main]

use gryt_agent::wire::JobSpec;
use libfuzzer_sys::fuzz_target;

/// Bodies are capped long before this in the agent (push: 10 MiB); the fuzzer only needs
/// enough room to build any structure, and a bound keeps every run's allocation bounded.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let spec = match JobSpec::from_json(data) {
        Ok(spec) => spec,
        Err(e) => {
            // The error names a field and never panics while being formatted.
            let _ = e.to_string();
            return;
        }
    };
    let _ = spec.branch();
    let debug = format!("{spec:?}");
    if spec.github_token_encrypted.is_some() {
        assert!(debug.contains("[MASKED]"), "Debug shows the token: {debug}");
    }
    let json = serde_json::to_vec(&spec).expect("a parsed spec serializes");
    let again = JobSpec::from_json(&json).expect("a serialized spec parses again");
    let json_again = serde_json::to_vec(&again).expect("the re-parsed spec serializes");
    assert_eq!(json, json_again, "serialize/parse is not a fixed point");
});
