//! The declarative YAML pipeline format (`version: 1`) and its validation.
//!
//! Validation is strict: unknown keys, wrong types and unknown versions are rejected with the
//! path of the offending field, because a typo (`stpes:`) silently ignored would run nothing.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::PipelineError;
use super::env::valid_env_name;
use crate::wire::{ArtifactWhen, ArtifactsSpec, CacheSpec, ServiceCommand, ServiceSpec};

/// Most steps one pipeline may have; far above any real pipeline, low enough to bound the result.
pub const MAX_STEPS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlPipeline {
    pub version: u32,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    pub steps: Vec<Step>,
    /// Files uploaded to the object store after the steps (the job spec's `artifacts` wins).
    #[serde(default)]
    pub artifacts: Option<YamlArtifacts>,
    /// Caches restored before the first step and saved after (the job spec's `cache` wins).
    #[serde(default)]
    pub cache: Vec<YamlCache>,
    /// Service containers started before the first step (combined with the job spec's).
    #[serde(default)]
    pub services: Vec<YamlService>,
    /// The document as written, kept to write it into the workspace.
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A shell command line, run with `sh -c`.
    pub run: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub continue_on_error: bool,
}

impl Step {
    /// The name shown for the step: its `name`, else the first line of its command.
    pub fn display_name(&self, index: usize) -> String {
        if let Some(name) = self.name.as_deref().filter(|n| !n.trim().is_empty()) {
            return name.to_owned();
        }
        let first = self
            .run
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        if first.is_empty() {
            return format!("step {}", index + 1);
        }
        let mut shown: String = first.chars().take(60).collect();
        if shown.len() < first.len() {
            shown.push('…');
        }
        shown
    }
}

/// `artifacts:` as written in a pipeline (the job spec's JSON has the same fields).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlArtifacts {
    pub paths: Vec<String>,
    #[serde(default)]
    pub when: ArtifactWhen,
}

/// One `cache:` entry as written in a pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlCache {
    pub key: String,
    #[serde(default)]
    pub files: Vec<String>,
    pub paths: Vec<String>,
}

/// One `services:` entry as written in a pipeline (the job spec's JSON has the same fields).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlService {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default)]
    pub command: Option<ServiceCommand>,
    #[serde(default)]
    pub ready_port: Option<u16>,
    #[serde(default)]
    pub ready_timeout_seconds: Option<u64>,
}

impl YamlPipeline {
    /// The pipeline's `services` in the job spec's terms.
    pub fn service_specs(&self) -> Vec<ServiceSpec> {
        self.services
            .iter()
            .map(|s| ServiceSpec {
                name: s.name.clone(),
                image: s.image.clone(),
                env: s
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
                command: s.command.clone(),
                ready_port: s.ready_port,
                ready_timeout_seconds: s.ready_timeout_seconds,
            })
            .collect()
    }

    /// The pipeline's `artifacts` in the job spec's terms.
    pub fn artifacts_spec(&self) -> Option<ArtifactsSpec> {
        self.artifacts.as_ref().map(|a| ArtifactsSpec {
            paths: a.paths.clone(),
            when: a.when,
        })
    }

    /// The pipeline's `cache` in the job spec's terms.
    pub fn cache_specs(&self) -> Vec<CacheSpec> {
        self.cache
            .iter()
            .map(|c| CacheSpec {
                key: c.key.clone(),
                files: c.files.clone(),
                paths: c.paths.clone(),
            })
            .collect()
    }
}

/// An environment value: YAML scalars of any type (`PORT: 8080`, `DEBUG: true`) become strings.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        de.deserialize_any(ScalarVisitor)
    }
}

/// True when the text means to be a declarative pipeline: a top-level `version:` or `steps:`
/// key, and no top-level Python import. Decided on lines rather than on a YAML parse so that a
/// YAML pipeline with a syntax error is reported as one instead of being run as a Python script.
pub fn looks_declarative(text: &str) -> bool {
    let mut has_key = false;
    for line in text.lines() {
        if line.starts_with("import ") || line.starts_with("from ") {
            return false;
        }
        let key = line.split(':').next().unwrap_or("").trim_end();
        if line.contains(':') && (key == "version" || key == "steps") {
            has_key = true;
        }
    }
    has_key
}

impl YamlPipeline {
    pub fn parse(text: &str) -> Result<Self, PipelineError> {
        let de = serde_norway::Deserializer::from_str(text);
        let mut pipeline: YamlPipeline = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let message = e.into_inner().to_string();
            if field == "." || field.is_empty() {
                PipelineError::Yaml(message)
            } else {
                PipelineError::Field { field, message }
            }
        })?;
        pipeline.source = text.to_owned();
        pipeline.validate()?;
        Ok(pipeline)
    }

    fn validate(&self) -> Result<(), PipelineError> {
        let field = |field: &str, message: &str| PipelineError::Field {
            field: field.to_owned(),
            message: message.to_owned(),
        };
        if self.version != 1 {
            return Err(field(
                "version",
                &format!(
                    "unsupported version {}; this agent runs version 1",
                    self.version
                ),
            ));
        }
        if self.steps.is_empty() {
            return Err(field("steps", "a pipeline needs at least one step"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(field("steps", &format!("more than {MAX_STEPS} steps")));
        }
        if let Some(image) = &self.image
            && image.trim().is_empty()
        {
            return Err(field("image", "must not be empty"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            if step.run.trim().is_empty() {
                return Err(field(&format!("steps[{i}].run"), "must not be empty"));
            }
            if step.timeout_seconds == Some(0) {
                return Err(field(
                    &format!("steps[{i}].timeout_seconds"),
                    "must be at least 1",
                ));
            }
        }
        if let Some(artifacts) = self.artifacts_spec() {
            crate::store::spec::check_artifacts(&artifacts).map_err(|(f, m)| field(&f, &m))?;
        }
        crate::store::spec::check_caches(&self.cache_specs()).map_err(|(f, m)| field(&f, &m))?;
        super::services::check_services("services", &self.service_specs())
            .map_err(|(f, m)| field(&f, &m))?;
        let all_env = self.env.keys().map(|k| ("env", k)).chain(
            self.steps
                .iter()
                .flat_map(|s| s.env.keys().map(|k| ("steps[].env", k))),
        );
        for (place, name) in all_env {
            if !valid_env_name(name) {
                return Err(field(
                    place,
                    &format!("`{name}` is not a valid environment variable name"),
                ));
            }
        }
        Ok(())
    }

    /// Pipeline-level environment as `KEY=value` pairs.
    pub fn env_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.0.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<YamlPipeline, PipelineError> {
        YamlPipeline::parse(text)
    }

    #[test]
    fn full_format() {
        let p = parse(
            "version: 1\nimage: alpine:3\nenv: {A: x, PORT: 8080}\nsteps:\n  - run: make\n    name: build\n    env: {B: y}\n    timeout_seconds: 60\n    continue_on_error: true\n",
        )
        .unwrap();
        assert_eq!(p.image.as_deref(), Some("alpine:3"));
        assert_eq!(p.env["PORT"], EnvValue("8080".into()));
        assert_eq!(p.steps[0].display_name(0), "build");
        assert!(p.steps[0].continue_on_error);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("version: 2\nsteps:\n  - run: x\n", "version"),
            ("version: 1\n", "steps"),
            ("version: 1\nsteps: []\n", "steps"),
            ("version: 1\nsteps:\n  - run: [1, 2]\n", "steps[0].run"),
            (
                "version: 1\nsteps:\n  - run: x\n    timeout_seconds: soon\n",
                "steps[0].timeout_seconds",
            ),
            ("version: 1\nstpes:\n  - run: x\n", "stpes"),
            (
                "version: 1\nsteps:\n  - run: x\n    env: {A: [1]}\n",
                "steps[0].env.A",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?}: {err}");
        }
    }

    #[test]
    fn artifacts_and_cache() {
        let p = parse(
            "version: 1\nsteps:\n  - run: make\nartifacts:\n  paths: [dist/, \"reports/*.xml\"]\n  when: on_failure\ncache:\n  - key: deps\n    files: [Cargo.lock]\n    paths: [.cargo-home, target]\n",
        )
        .unwrap();
        let a = p.artifacts_spec().unwrap();
        assert_eq!(a.paths, ["dist/", "reports/*.xml"]);
        assert_eq!(a.when, ArtifactWhen::OnFailure);
        assert_eq!(p.cache_specs()[0].paths, [".cargo-home", "target"]);
        let cases = [
            ("artifacts:\n  paths: [../etc]\n", "artifacts.paths[0]"),
            ("artifacts:\n  paths: [/etc/passwd]\n", "artifacts.paths[0]"),
            (
                "artifacts:\n  paths: [a]\n  when: sometimes\n",
                "artifacts.when",
            ),
            ("artifacts:\n  pahts: [a]\n", "pahts"),
            ("cache:\n  - key: a/b\n    paths: [x]\n", "cache[0].key"),
            ("cache:\n  - key: k\n    paths: []\n", "cache[0].paths"),
            (
                "cache:\n  - key: k\n    paths: [x/../../y]\n",
                "cache[0].paths[0]",
            ),
        ];
        for (tail, field) in cases {
            let text = format!("version: 1\nsteps:\n  - run: x\n{tail}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{tail:?}: {err}");
        }
    }

    #[test]
    fn services() {
        let p = parse(
            "version: 1\nsteps:\n  - run: x\nservices:\n  - name: db\n    image: postgres:16\n    env: {POSTGRES_PASSWORD: x, PORT: 5432}\n    command: [postgres, -c, fsync=off]\n    ready_port: 5432\n    ready_timeout_seconds: 30\n  - name: web\n    image: busybox\n    command: httpd -f -p 80\n",
        )
        .unwrap();
        let s = p.service_specs();
        assert_eq!(s[0].env["PORT"], "5432");
        assert_eq!(
            s[0].command,
            Some(ServiceCommand::Args(vec![
                "postgres".into(),
                "-c".into(),
                "fsync=off".into()
            ]))
        );
        assert_eq!((s[0].ready_port, s[0].ready_timeout()), (Some(5432), 30));
        assert_eq!(
            s[1].command,
            Some(ServiceCommand::Shell("httpd -f -p 80".into()))
        );
        assert_eq!((s[1].ready_port, s[1].ready_timeout()), (None, 60));
        let cases = [
            ("services:\n  - name: db\n", "services[0]"),
            (
                "services:\n  - name: db\n    image: i\n    prot: 1\n",
                "prot",
            ),
            (
                "services:\n  - name: 1db\n    image: i\n",
                "services[0].name",
            ),
            (
                "services:\n  - name: db\n    image: i\n  - name: db\n    image: j\n",
                "services[1].name",
            ),
            (
                "services:\n  - name: db\n    image: i\n    ready_port: 70000\n",
                "services[0].ready_port",
            ),
            (
                "services:\n  - name: db\n    image: i\n    ready_port: 0\n",
                "services[0].ready_port",
            ),
            (
                "services:\n  - name: db\n    image: i\n    command: {a: b}\n",
                "services[0].command",
            ),
            (
                "services:\n  - name: db\n    image: i\n    ready_timeout_seconds: 0\n",
                "services[0].ready_timeout_seconds",
            ),
        ];
        for (tail, field) in cases {
            let text = format!("version: 1\nsteps:\n  - run: x\n{tail}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{tail:?}: {err}");
        }
    }

    #[test]
    fn broken_yaml_is_still_recognised_as_yaml() {
        let text = "version: 1\nsteps:\n  - run: echo [unclosed\n   bad: : :\n";
        assert!(looks_declarative(text));
        assert!(matches!(
            parse(text),
            Err(PipelineError::Yaml(_) | PipelineError::Field { .. })
        ));
    }

    #[test]
    fn python_is_not_declarative() {
        assert!(!looks_declarative(
            "from gryt import Pipeline\nsteps: list = []\n"
        ));
        assert!(!looks_declarative("print('version: 1')\n"));
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!(
            "version: 1\nsteps:\n  - run: x\n    env: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn step_names_default_to_the_command() {
        let step = Step {
            run: "\n  cargo test --all\nmore".into(),
            name: None,
            env: Default::default(),
            timeout_seconds: None,
            continue_on_error: false,
        };
        assert_eq!(step.display_name(3), "cargo test --all");
    }
}
