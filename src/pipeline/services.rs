//! The rules every service entry must pass, whether it comes from a YAML pipeline's `services:`
//! or from the job spec's JSON `services`. Pure: a bad entry is refused before anything runs.

use std::collections::BTreeSet;

use crate::wire::{ServiceCommand, ServiceSpec};

use super::env::valid_env_name;

/// Longest DNS label, hence longest service name.
pub const MAX_NAME_CHARS: usize = 63;
/// Most environment entries one service may have, and their total size (as for a job's own).
pub const MAX_ENV_VARS: usize = 1000;
pub const MAX_ENV_BYTES: usize = 1024 * 1024;

/// Names a service may not take: the agent names its own containers `gryt-…` (a service of that
/// name could answer for the job container on the network), and `localhost` resolves to the
/// job container itself whatever the network says.
const RESERVED_PREFIX: &str = "gryt-";
const RESERVED_NAMES: &[&str] = &["localhost"];

/// Checks `services` (at `place`, e.g. `services`); the error is the offending field's path and
/// what is wrong with it.
pub fn check_services(place: &str, services: &[ServiceSpec]) -> Result<(), (String, String)> {
    let mut seen = BTreeSet::new();
    for (i, service) in services.iter().enumerate() {
        let at = |field: &str| format!("{place}[{i}].{field}");
        check_name(&service.name).map_err(|m| (at("name"), m))?;
        if !seen.insert(service.name.to_ascii_lowercase()) {
            return Err((
                at("name"),
                format!("`{}` is used by another service", service.name),
            ));
        }
        check_image(&service.image).map_err(|m| (at("image"), m))?;
        check_env(service).map_err(|m| (at("env"), m))?;
        if let Some(command) = &service.command {
            check_command(command).map_err(|m| (at("command"), m))?;
        }
        if service.ready_port == Some(0) {
            return Err((at("ready_port"), "must be between 1 and 65535".into()));
        }
        if service.ready_timeout_seconds == Some(0) {
            return Err((at("ready_timeout_seconds"), "must be at least 1".into()));
        }
    }
    Ok(())
}

/// A DNS label that no resolver can take for anything else: a letter first (`1` would be read
/// as the address 0.0.0.1), then letters, digits and `-`, not ending in `-`, at most 63.
fn check_name(name: &str) -> Result<(), String> {
    let shown = name.escape_debug();
    let valid = name.len() <= MAX_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid {
        return Err(format!(
            "`{shown}` is not a service name: use a letter, then letters, digits and `-` \
             (at most {MAX_NAME_CHARS}, not ending in `-`)"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(RESERVED_PREFIX) || RESERVED_NAMES.contains(&lower.as_str()) {
        return Err(format!(
            "`{shown}` is reserved (the agent's containers are named `{RESERVED_PREFIX}…`)"
        ));
    }
    Ok(())
}

fn check_image(image: &str) -> Result<(), String> {
    if image.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{}` is not an image name", image.escape_debug()));
    }
    Ok(())
}

fn check_env(service: &ServiceSpec) -> Result<(), String> {
    if service.env.len() > MAX_ENV_VARS {
        return Err(format!("more than {MAX_ENV_VARS} entries"));
    }
    let bytes: usize = service.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if bytes > MAX_ENV_BYTES {
        return Err(format!("more than {MAX_ENV_BYTES} bytes"));
    }
    for (name, value) in &service.env {
        if !valid_env_name(name) || value.contains('\0') {
            return Err(format!(
                "`{}`: names must be non-empty without `=`, values without NUL",
                name.escape_debug()
            ));
        }
    }
    Ok(())
}

fn check_command(command: &ServiceCommand) -> Result<(), String> {
    let has_nul = match command {
        ServiceCommand::Args(args) => {
            if args.first().is_none_or(|a| a.is_empty()) {
                return Err("a list must start with the program to run".into());
            }
            args.iter().any(|a| a.contains('\0'))
        }
        ServiceCommand::Shell(line) => {
            if line.trim().is_empty() {
                return Err("must not be empty".into());
            }
            line.contains('\0')
        }
    };
    if has_nul {
        return Err("must not contain NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: "postgres:16".into(),
            ..Default::default()
        }
    }

    fn refused(services: &[ServiceSpec]) -> (String, String) {
        check_services("services", services).expect_err("must be refused")
    }

    #[test]
    fn good_names_pass() {
        let ok = [service("db"), service("redis-7"), service(&"a".repeat(63))];
        assert_eq!(check_services("services", &ok), Ok(()));
    }

    #[test]
    fn names_must_be_dns_labels_unique_and_not_the_agents() {
        for name in [
            "",
            "1db",
            "-db",
            "db-",
            "d_b",
            "d.b",
            "db ",
            "ünï",
            &"a".repeat(64),
            "gryt-job",
            "GRYT-x",
            "localhost",
        ] {
            let (field, message) = refused(&[service(name)]);
            assert_eq!(field, "services[0].name", "{name:?}: {message}");
        }
        let (field, message) = refused(&[service("db"), service("DB")]);
        assert_eq!(field, "services[1].name");
        assert!(message.contains("another service"), "{message}");
    }

    #[test]
    fn every_field_is_checked_and_named() {
        let cases: Vec<(ServiceSpec, &str)> = vec![
            (
                ServiceSpec {
                    image: " ".into(),
                    ..service("db")
                },
                "image",
            ),
            (
                ServiceSpec {
                    image: "a b".into(),
                    ..service("db")
                },
                "image",
            ),
            (
                ServiceSpec {
                    env: [("A=B".to_string(), "x".to_string())].into(),
                    ..service("db")
                },
                "env",
            ),
            (
                ServiceSpec {
                    env: [("A".to_string(), "x\0".to_string())].into(),
                    ..service("db")
                },
                "env",
            ),
            (
                ServiceSpec {
                    command: Some(ServiceCommand::Args(vec![])),
                    ..service("db")
                },
                "command",
            ),
            (
                ServiceSpec {
                    command: Some(ServiceCommand::Shell("  ".into())),
                    ..service("db")
                },
                "command",
            ),
            (
                ServiceSpec {
                    command: Some(ServiceCommand::Args(vec!["a\0".into()])),
                    ..service("db")
                },
                "command",
            ),
            (
                ServiceSpec {
                    ready_port: Some(0),
                    ..service("db")
                },
                "ready_port",
            ),
            (
                ServiceSpec {
                    ready_timeout_seconds: Some(0),
                    ..service("db")
                },
                "ready_timeout_seconds",
            ),
        ];
        for (spec, field) in cases {
            let (got, message) = refused(&[spec]);
            assert_eq!(got, format!("services[0].{field}"), "{message}");
        }
    }

    #[test]
    fn too_much_env_is_refused() {
        let spec = ServiceSpec {
            env: (0..=MAX_ENV_VARS)
                .map(|i| (format!("V{i}"), String::new()))
                .collect(),
            ..service("db")
        };
        assert_eq!(refused(&[spec]).0, "services[0].env");
    }
}
