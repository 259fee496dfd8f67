//! The settings' tests: layers, validation messages, and the declaration itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;

use super::values::state_dir_for;
use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn layers_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "port = 9000\n[docker]\nimage = \"from-file\"\nnetwork = \"none\"\n",
    )
    .unwrap();
    let s = Settings::load_from(
        Some(&file),
        &env(&[
            ("GRYT_DOCKER_IMAGE", "from-env"),
            ("GRYT_AGENT_LABELS", "linux, x86 ,"),
            ("AGENT_PORT", "9100"),
        ]),
        &[("docker.image", "from-flag".into())],
    )
    .unwrap();
    assert_eq!(s.docker.image, "from-flag");
    assert_eq!(s.docker.network, "none");
    assert_eq!(s.port, 9100);
    assert_eq!(s.labels, ["linux", "x86"]);
    assert_eq!(s.job.timeout_seconds, 3600);
}

#[test]
fn invalid_values_name_the_key() {
    let err = Settings::load_from(None, &env(&[("GRYT_JOB_TIMEOUT", "soon")]), &[]).unwrap_err();
    assert!(err.to_string().contains("job.timeout_seconds"), "{err}");
    let err = Settings::load_from(None, &env(&[("GRYT_MEMORY_LIMIT", "lots")]), &[]).unwrap_err();
    assert!(err.to_string().contains("docker.memory_limit"), "{err}");
    let err = Settings::load_from(None, &env(&[("GRYT_CONTAINER_USER", "0:0")]), &[]).unwrap_err();
    assert!(err.to_string().contains("docker.user"), "{err}");
    let err =
        Settings::load_from(None, &[], &[("docker.pull_policy", "sometimes".into())]).unwrap_err();
    assert!(err.to_string().contains("pull_policy"), "{err}");
    let err = Settings::load_from(None, &env(&[("GRYT_PUSH_MAX_QUEUE", "257")]), &[]).unwrap_err();
    assert!(err.to_string().contains("push.max_queue"), "{err}");
    let s = Settings::load_from(None, &env(&[("GRYT_PUSH_MAX_QUEUE", "0")]), &[]).unwrap();
    assert_eq!(s.push.max_queue, 0);
}

#[test]
fn the_example_file_is_valid_and_documents_every_variable() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.example.toml");
    Settings::load_from(Some(Path::new(example)), &[], &[]).unwrap();
    let text = std::fs::read_to_string(example).unwrap();
    for (var, _) in env_vars() {
        assert!(
            text.contains(var),
            "config/agent.example.toml does not mention {var}"
        );
    }
}

#[test]
fn secret_env_patterns_from_env_and_validated() {
    let s = Settings::load_from(None, &[], &[]).unwrap();
    assert_eq!(
        s.secret_env_patterns,
        ["*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*"]
    );
    let s = Settings::load_from(
        None,
        &env(&[("GRYT_SECRET_ENV_PATTERNS", "*TOKEN*, DEPLOY_*,")]),
        &[],
    )
    .unwrap();
    assert_eq!(s.secret_env_patterns, ["*TOKEN*", "DEPLOY_*"]);
    let err =
        Settings::load_from(None, &env(&[("GRYT_SECRET_ENV_PATTERNS", "a[")]), &[]).unwrap_err();
    assert!(err.to_string().contains("secret_env_patterns"), "{err}");
}

#[test]
fn no_shared_temp_dir_fallback_for_the_state_dir() {
    assert_eq!(
        state_dir_for(false, None, Some("/home/ci".into())),
        Path::new("/home/ci/.local/state/gryt-agent")
    );
    assert_eq!(
        state_dir_for(true, None, None),
        Path::new("/var/lib/gryt-agent")
    );
    let none = state_dir_for(false, None, Some("".into()));
    assert_eq!(none, PathBuf::new());
    assert!(!none.starts_with(std::env::temp_dir()));
    let err = Settings::load_from(None, &env(&[("GRYT_STATE_DIR", "")]), &[]).unwrap_err();
    assert!(err.to_string().contains("GRYT_STATE_DIR"), "{err}");
    let err = Settings::load_from(None, &env(&[("GRYT_LOG_GIVE_UP", "0")]), &[]).unwrap_err();
    assert!(err.to_string().contains("log_give_up_seconds"), "{err}");
}

#[test]
fn durations_and_limits_above_their_maximum_are_refused_naming_both() {
    let err = Settings::load_from(None, &env(&[("GRYT_JOB_TIMEOUT", "86401")]), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("job.timeout_seconds") && err.contains("job.max_timeout_seconds = 86400"),
        "{err}"
    );
    let s = Settings::load_from(
        None,
        &env(&[
            ("GRYT_JOB_TIMEOUT", "86401"),
            ("GRYT_MAX_JOB_TIMEOUT", "90000"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(s.job.max_timeout_seconds, 90000);
    for (var, key) in [
        ("GRYT_STOP_GRACE", "job.stop_grace_seconds"),
        ("GRYT_SHUTDOWN_TIMEOUT", "shutdown_timeout_seconds"),
        ("GRYT_CHECKOUT_TIMEOUT", "checkout.timeout_seconds"),
        ("GRYT_MAX_JOB_TIMEOUT", "job.max_timeout_seconds"),
    ] {
        let err = Settings::load_from(None, &env(&[(var, "18446744073709551615")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{var}: {err}");
    }
    let err = Settings::load_from(
        None,
        &env(&[("GRYT_MEMORY_LIMIT", "4g"), ("GRYT_MAX_MEMORY", "1g")]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("docker.memory_limit") && err.contains("docker.max_memory = 1g"),
        "{err}"
    );
    let err = Settings::load_from(None, &env(&[("GRYT_CPU_LIMIT", "4096")]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("docker.max_cpus"), "{err}");
    let err = Settings::load_from(
        None,
        &env(&[
            ("GRYT_CPU_LIMIT", "1"),
            ("GRYT_MAX_CPUS", "1.5"),
            ("GRYT_MAX_MEMORY", "lots"),
        ]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("docker.max_memory"), "{err}");
}

#[test]
fn store_settings_are_bounded_and_name_the_key() {
    let s = Settings::load_from(
        None,
        &env(&[
            ("GRYT_STORE_URL", "s3://bucket/prefix"),
            ("GRYT_STORE_ENDPOINT", "http://127.0.0.1:3900"),
            ("GRYT_STORE_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "GKid"),
            ("AWS_SECRET_ACCESS_KEY", "visible-store-secret"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(s.store.url.as_deref(), Some("s3://bucket/prefix"));
    assert!(!format!("{s:?}").contains("visible-store-secret"));
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GRYT_STORE_URL", "https://bucket")], "store.url"),
        (&[("GRYT_STORE_URL", "s3://")], "store.url"),
        (
            &[("GRYT_STORE_ENDPOINT", "http://minio:9000")],
            "store.endpoint",
        ),
        (&[("GRYT_STORE_ENDPOINT", "minio:9000")], "store.endpoint"),
        (&[("GRYT_STORE_PART_SIZE", "1024")], "store.part_size_bytes"),
        (
            &[("GRYT_STORE_PART_SIZE", "99999999999")],
            "store.part_size_bytes",
        ),
        (&[("GRYT_STORE_RETRIES", "1000")], "store.retries"),
        (
            &[("GRYT_STORE_MAX_CACHE_BYTES", "0")],
            "store.max_cache_bytes",
        ),
        (&[("AWS_ACCESS_KEY_ID", "GKid")], "store.access_key_id"),
    ];
    for (vars, key) in cases {
        let err = Settings::load_from(None, &env(vars), &[]).unwrap_err();
        assert!(err.to_string().contains(key), "{vars:?}: {err}");
    }
}

#[test]
fn allowed_images_are_globs_and_the_default_image_must_match() {
    let s = Settings::load_from(None, &[], &[]).unwrap();
    assert_eq!(s.docker.allowed_images, ["*"]);
    let s = Settings::load_from(
        None,
        &env(&[
            ("GRYT_ALLOWED_IMAGES", "ghcr.io/acme/*, alpine:*"),
            ("GRYT_DOCKER_IMAGE", "alpine:3"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(s.docker.allowed_images, ["ghcr.io/acme/*", "alpine:*"]);
    let err = Settings::load_from(
        None,
        &env(&[("GRYT_ALLOWED_IMAGES", "ghcr.io/acme/*")]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("docker.image") && err.contains("allowed_images"),
        "{err}"
    );
    let err = Settings::load_from(None, &env(&[("GRYT_ALLOWED_IMAGES", "a[")]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("docker.allowed_images"), "{err}");
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "[docker]\nimgae = \"typo\"\n").unwrap();
    let err = Settings::load_from(Some(&file), &[], &[]).unwrap_err();
    assert!(err.to_string().contains("imgae"), "{err}");
}

#[test]
fn api_key_from_a_file_and_never_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "k3y-from-file-0123456789abcdef0123\n").unwrap();
    let s = Settings::load_from(
        None,
        &env(&[("AGENT_API_KEY_FILE", key_file.to_str().unwrap())]),
        &[],
    )
    .unwrap();
    assert_eq!(
        s.api_key().unwrap().unwrap().expose_secret(),
        "k3y-from-file-0123456789abcdef0123"
    );
    let s = Settings::load_from(None, &env(&[("AGENT_API_KEY", "visible-secret")]), &[]).unwrap();
    assert!(!format!("{s:?}").contains("visible-secret"));
}

#[test]
fn disk_collection_settings_from_env_and_bounded() {
    let s = Settings::load_from(None, &[], &[]).unwrap();
    assert_eq!(s.docker.gc_images, GcImages::Agent);
    assert!(s.disk.gc_trigger_free_mb <= s.disk.gc_target_free_mb);
    let s = Settings::load_from(
        None,
        &env(&[
            ("GRYT_GC_IMAGES", "all"),
            ("GRYT_GC_TRIGGER_FREE_MB", "100"),
            ("GRYT_GC_TARGET_FREE_MB", "200"),
            ("GRYT_GC_INTERVAL", "60"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(s.docker.gc_images, GcImages::All);
    assert_eq!(
        (s.disk.gc_trigger_free_mb, s.disk.gc_target_free_mb),
        (100, 200)
    );
    assert_eq!(s.disk.gc_interval_seconds, 60);
    for (var, value, key) in [
        ("GRYT_GC_IMAGES", "some", "gc_images"),
        ("GRYT_GC_TARGET_FREE_MB", "10", "disk.gc_target_free_mb"),
        (
            "GRYT_GC_TRIGGER_FREE_MB",
            "99999999999999",
            "disk.gc_trigger_free_mb",
        ),
        ("GRYT_GC_INTERVAL", "0", "disk.gc_interval_seconds"),
    ] {
        let err = Settings::load_from(None, &env(&[(var, value)]), &[]).unwrap_err();
        assert!(err.to_string().contains(key), "{var}={value}: {err}");
    }
}

#[test]
fn every_setting_is_documented_and_its_names_are_unique() {
    let mut keys = HashSet::new();
    let mut vars = HashSet::new();
    let mut flags = HashSet::new();
    for s in settings() {
        assert!(!s.doc_text().is_empty(), "`{}` has no doc", s.key);
        assert!(keys.insert(s.key), "`{}` is declared twice", s.key);
        assert!(!s.env.is_empty(), "`{}` has no environment variable", s.key);
        for var in s.env {
            assert!(vars.insert(*var), "{var} sets two settings");
        }
        if let Some(flag) = s.flag {
            assert!(flags.insert(flag.long), "--{} is two flags", flag.long);
            assert!(
                flag.value == FlagValue::Switch || !flag.value_name.is_empty(),
                "--{} has no value name",
                flag.long
            );
        }
    }
    // The sections are all there, and `store.region` keeps both its names (the later wins).
    for key in [
        "port",
        "docker.image",
        "job.gryt_command",
        "push.enabled",
        "store.retries",
    ] {
        assert!(keys.contains(key), "{key}");
    }
    let region = settings().iter().find(|s| s.key == "store.region").unwrap();
    assert_eq!(region.env, ["AWS_REGION", "GRYT_STORE_REGION"]);
    let s = Settings::load_from(
        None,
        &env(&[("AWS_REGION", "a"), ("GRYT_STORE_REGION", "b")]),
        &[],
    )
    .unwrap();
    assert_eq!(s.store.region.as_deref(), Some("b"));
}

#[test]
fn the_flags_of_run_are_the_ones_it_always_had() {
    let flags: Vec<(&str, &str, FlagValue)> = settings()
        .iter()
        .filter_map(|s| s.flag.map(|f| (s.key, f.long, f.value)))
        .collect();
    assert_eq!(
        flags,
        [
            ("agent_id", "agent-id", FlagValue::Text),
            ("labels", "labels", FlagValue::Text),
            ("state_dir", "state-dir", FlagValue::Path),
            ("api_url", "api-url", FlagValue::Text),
            ("concurrency", "concurrency", FlagValue::Usize),
            ("host", "host", FlagValue::Text),
            ("port", "port", FlagValue::U16),
            ("push.enabled", "push", FlagValue::Switch),
        ]
    );
    let s = Settings::load_from(None, &[], &[("labels", "a, b".into())]).unwrap();
    assert_eq!(s.labels, ["a", "b"]);
    let s = Settings::load_from(None, &env(&[("GRYT_COMMAND", "gryt  run x.py")]), &[]).unwrap();
    assert_eq!(s.job.gryt_command, ["gryt", "run", "x.py"]);
}

#[test]
fn the_job_user_is_read_once_at_load() {
    assert_eq!(
        JobUser::parse(JobUser::DEFAULT_TEXT),
        Ok(JobUser::default())
    );
    assert_eq!(Settings::default().docker.job_user, JobUser::default());
    let s = Settings::load_from(None, &env(&[("GRYT_CONTAINER_USER", "1234")]), &[]).unwrap();
    assert_eq!(
        s.docker.job_user,
        JobUser {
            uid: 1234,
            gid: 1234
        }
    );
    let s = Settings::load_from(None, &env(&[("GRYT_CONTAINER_USER", "5:6")]), &[]).unwrap();
    assert_eq!(s.docker.job_user.ids(), (5, 6));
    let err = Settings::load_from(None, &env(&[("GRYT_CONTAINER_USER", "ci")]), &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid setting `docker.user`: `ci` is not numeric `uid[:gid]`"
    );
}

#[test]
fn the_warm_pool_defaults_to_one_turns_off_at_zero_and_is_bounded() {
    let s = Settings::load_from(None, &[], &[]).unwrap();
    assert_eq!(s.docker.warm_pool, 1);
    let s = Settings::load_from(None, &env(&[("GRYT_WARM_POOL", "0")]), &[]).unwrap();
    assert_eq!(s.docker.warm_pool, 0);
    let s = Settings::load_from(None, &env(&[("GRYT_WARM_POOL", "64")]), &[]).unwrap();
    assert_eq!(s.docker.warm_pool, crate::config::MAX_WARM_POOL);
    let error = Settings::load_from(None, &env(&[("GRYT_WARM_POOL", "65")]), &[])
        .expect_err("a pool above 64 must be refused")
        .to_string();
    assert!(
        error.contains("docker.warm_pool") && error.contains("64"),
        "{error}"
    );
}
