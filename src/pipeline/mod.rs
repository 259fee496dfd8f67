//! Pipelines: decoding `pipeline_b64` and telling the two kinds apart.
//!
//! A pipeline is either a gryt Python script (run by the `gryt` CLI inside the image) or a
//! declarative YAML pipeline (`version: 1`, `steps: - run: ...`) that the agent runs itself.
//! Everything here is pure: nothing touches Docker, so a bad pipeline is rejected before any
//! container exists.

pub mod env;
pub mod gryt_report;
pub mod services;
pub mod yaml;

use base64::Engine;

pub use yaml::{Step, YamlPipeline};

/// Largest decoded pipeline accepted. Pipelines are source files; anything this big is a mistake
/// or an attack, and it would be written to disk and parsed.
pub const MAX_PIPELINE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Pipeline {
    /// A Python script for `gryt run`.
    Gryt { script: String },
    /// A declarative pipeline the agent runs step by step.
    Yaml(YamlPipeline),
}

impl Pipeline {
    /// The artifacts and caches the job wants: the job spec's fields, else the YAML pipeline's.
    pub fn storage_wanted(&self, job: &crate::wire::JobSpec) -> crate::store::spec::Wanted {
        let yaml = match self {
            Pipeline::Yaml(p) => Some(p),
            Pipeline::Gryt { .. } => None,
        };
        crate::store::spec::Wanted {
            artifacts: job
                .artifacts
                .clone()
                .or_else(|| yaml.and_then(|p| p.artifacts_spec())),
            caches: job
                .cache
                .clone()
                .unwrap_or_else(|| yaml.map(|p| p.cache_specs()).unwrap_or_default()),
        }
    }

    /// Decodes and classifies `pipeline_b64` (standard or URL-safe base64, padding optional).
    pub fn from_b64(pipeline_b64: &str) -> Result<Self, PipelineError> {
        let compact: String = pipeline_b64
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if compact.len() > MAX_PIPELINE_BYTES / 3 * 4 + 4 {
            return Err(PipelineError::TooLarge {
                limit: MAX_PIPELINE_BYTES,
            });
        }
        let bytes = decode_b64(&compact)?;
        let text = String::from_utf8(bytes).map_err(|_| PipelineError::NotUtf8)?;
        Self::from_text(&text)
    }

    /// Classifies a pipeline's text: a YAML mapping with `version` or `steps` at the top is a
    /// declarative pipeline (and must then be a valid one); anything else is a gryt script.
    pub fn from_text(text: &str) -> Result<Self, PipelineError> {
        if text.len() > MAX_PIPELINE_BYTES {
            return Err(PipelineError::TooLarge {
                limit: MAX_PIPELINE_BYTES,
            });
        }
        if text.contains('\0') {
            return Err(PipelineError::NulByte);
        }
        if yaml::looks_declarative(text) {
            return YamlPipeline::parse(text).map(Pipeline::Yaml);
        }
        if text.trim().is_empty() {
            return Err(PipelineError::Empty);
        }
        Ok(Pipeline::Gryt {
            script: text.to_owned(),
        })
    }

    /// The image the pipeline asks for, if any.
    pub fn image(&self) -> Option<&str> {
        match self {
            Pipeline::Yaml(p) => p.image.as_deref(),
            Pipeline::Gryt { .. } => None,
        }
    }

    /// The file the pipeline is written to in the workspace, as the existing agent does.
    pub fn file_name(&self) -> &'static str {
        match self {
            Pipeline::Yaml(_) => "pipeline.yml",
            Pipeline::Gryt { .. } => "pipeline.py",
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Pipeline::Yaml(p) => &p.source,
            Pipeline::Gryt { script } => script,
        }
    }
}

fn decode_b64(compact: &str) -> Result<Vec<u8>, PipelineError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let alphabet = if compact.contains(['-', '_']) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    GeneralPurpose::new(alphabet, config)
        .decode(compact)
        .map_err(|e| PipelineError::Base64(e.to_string()))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PipelineError {
    #[error("pipeline_b64 is not valid base64: {0}")]
    Base64(String),
    #[error("pipeline is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("pipeline is not UTF-8 text")]
    NotUtf8,
    #[error("pipeline contains a NUL byte")]
    NulByte,
    #[error("pipeline is empty")]
    Empty,
    #[error("invalid YAML pipeline: {0}")]
    Yaml(String),
    #[error("invalid YAML pipeline: field `{field}`: {message}")]
    Field { field: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn the_documented_hello_pipeline_is_yaml() {
        let b64 = STANDARD.encode("version: 1\nsteps:\n  - run: echo Hello");
        let Pipeline::Yaml(p) = Pipeline::from_b64(&b64).unwrap() else {
            panic!("not yaml")
        };
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].run, "echo Hello");
    }

    #[test]
    fn a_python_script_is_a_gryt_pipeline() {
        let script = "from gryt import Pipeline, CommandStep\n\nPIPELINE = Pipeline([CommandStep('a', {'cmd': ['true']})])\n";
        let p = Pipeline::from_b64(&STANDARD.encode(script)).unwrap();
        assert_eq!(
            p,
            Pipeline::Gryt {
                script: script.into()
            }
        );
        assert_eq!(p.file_name(), "pipeline.py");
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(
            Pipeline::from_b64("%%%not base64"),
            Err(PipelineError::Base64(_))
        ));
        assert_eq!(
            Pipeline::from_b64(&STANDARD.encode([0xff, 0xfe])),
            Err(PipelineError::NotUtf8)
        );
        assert_eq!(
            Pipeline::from_b64(&STANDARD.encode("a\0b")),
            Err(PipelineError::NulByte)
        );
        assert_eq!(Pipeline::from_b64(""), Err(PipelineError::Empty));
        let huge = "#".repeat(MAX_PIPELINE_BYTES + 1);
        assert!(matches!(
            Pipeline::from_b64(&STANDARD.encode(huge)),
            Err(PipelineError::TooLarge { .. })
        ));
    }

    #[test]
    fn url_safe_and_unpadded_base64_are_accepted() {
        let text = "version: 1\nsteps:\n  - run: echo ?>?>\n";
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        assert!(matches!(Pipeline::from_b64(&url), Ok(Pipeline::Yaml(_))));
    }
}
