//! Pipeline decoding and classification on arbitrary input: `Pipeline::from_text` on UTF-8
//! text, `Pipeline::from_b64` on the input as a string and on the input's base64 (so the YAML
//! parser is reached through the same path `pipeline_b64` takes). Nothing panics, and decoding
//! through base64 classifies exactly as the text itself does.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gryt_agent::pipeline::{Pipeline, PipelineError};
use libfuzzer_sys::fuzz_target;

const MAX_INPUT: usize = 64 * 1024;

fn check(result: &Result<Pipeline, PipelineError>, text: Option<&str>) {
    match result {
        Ok(p) => {
            let _ = (p.image(), p.file_name());
            if let Some(text) = text {
                assert_eq!(p.text(), text, "the pipeline's text is not its source");
            }
            if let Pipeline::Yaml(y) = p {
                for (i, step) in y.steps.iter().enumerate() {
                    let _ = step.display_name(i);
                }
                let _ = y.env_pairs().count();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let direct = Pipeline::from_text(text);
        check(&direct, Some(text));
        // The same text, as the API sends it.
        let via_b64 = Pipeline::from_b64(&STANDARD.encode(text));
        assert_eq!(direct, via_b64, "base64 changed the outcome");
        let via_url_safe = Pipeline::from_b64(&URL_SAFE_NO_PAD.encode(text));
        assert_eq!(direct, via_url_safe, "URL-safe base64 changed the outcome");
        // The input itself taken as `pipeline_b64`.
        check(&Pipeline::from_b64(text), None);
    } else {
        // Bytes that are not UTF-8 are refused after decoding, never parsed.
        let via_b64 = Pipeline::from_b64(&STANDARD.encode(data));
        assert_eq!(via_b64, Err(PipelineError::NotUtf8));
    }
});
