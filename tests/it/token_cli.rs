//! `gryt-agent token verify` run as a binary, the way an operator would run it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const KEY: &str = "IpHYzcMQQR5+wnN4pmHJNRh8B+TVY26bw8QAsnJEuM0=";
const OTHER_KEY: &str = "Ry16zsu02wzJNq2kFt1jH6tyS66Cf+dkHZvaehsmYp0=";
const FERNET: &str = "gAAAAABrCQLq38eTP-P30hgCdeZTC5uMnuUpyeuxfRhnSW385wH3MrofpqV7vFgxG32uUrEbzczLv01Ve20wiu6gHD_JIJGFCQINi5LhrmHZ6zq9bfnLDDntRZdB_0wv4bDq2GZJG21tmnJIZuT-CJSJDpGuzmafgC1KxDH1Q90GwLeDnt4uzxOGmNlnEeIOpHPDcOXK0tzF";
const GCM: &str = "ltoIej6+zGdqqixdORgoiUqmGprYK89gsu0PsDvewfl7f7CPPO7vmBccJpb619xdME63ajj1X9aNWjMmMeIWlq25ASf+tIGWkCpFDMCby/NBtdo/4i+AZsjEolhmpceL2oyso9JGN+L6xGw3UZ9EAYHO";
const PLAINTEXT: &str =
    "github_pat_8g5ubbbPIa84yRn_BUbHoWC8FJowoRoWD8s7bA16J7PglOU3shVv5U_TG79BG16QmtsL_4F28Gz";

/// Runs `gryt-agent token verify` with only `env` set and an empty settings file, so neither
/// this machine's environment nor /etc/gryt-agent/agent.toml leaks in.
fn verify(env: &[(&str, &str)], extra: &[&str], stdin: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
        .arg("--config")
        .arg(&config)
        .args(["token", "verify"])
        .args(extra)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command may exit before reading (no key configured): a broken pipe here is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn assert_plaintext_absent(out: &Output) {
    assert!(!text(&out.stdout).contains(PLAINTEXT));
    assert!(!text(&out.stderr).contains(PLAINTEXT));
    assert!(!text(&out.stderr).contains(KEY));
}

#[test]
fn reports_a_token_it_opens_without_printing_it() {
    let out = verify(&[("GRYT_ENCRYPTION_KEY", KEY)], &[], &format!("{FERNET}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "scheme: fernet\nplaintext length: {}\nkey: current\n",
            PLAINTEXT.len()
        )
    );
    assert_plaintext_absent(&out);

    let out = verify(
        &[("GRYT_ENCRYPTION_KEY", KEY)],
        &[],
        &format!("  {GCM}  \n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("scheme: aes-256-gcm\n"));
    assert_plaintext_absent(&out);
}

#[test]
fn reveal_prints_exactly_the_plaintext() {
    let out = verify(&[("GRYT_ENCRYPTION_KEY", KEY)], &["--reveal"], FERNET);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{PLAINTEXT}\n"));
}

#[test]
fn says_when_the_previous_key_opened_it() {
    let out = verify(
        &[
            ("GRYT_ENCRYPTION_KEY", OTHER_KEY),
            ("GRYT_ENCRYPTION_KEY_PREVIOUS", KEY),
        ],
        &[],
        GCM,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with("key: previous\n"));
}

#[test]
fn a_wrong_key_fails_with_the_reason() {
    let out = verify(&[("GRYT_ENCRYPTION_KEY", OTHER_KEY)], &["--reveal"], FERNET);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("token could not be decrypted with GRYT_ENCRYPTION_KEY"),
        "{}",
        text(&out.stderr)
    );
    assert_plaintext_absent(&out);
}

#[test]
fn no_key_fails_naming_the_setting() {
    let out = verify(&[], &[], FERNET);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("GRYT_ENCRYPTION_KEY"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_malformed_key_or_empty_input_fails() {
    let out = verify(&[("GRYT_ENCRYPTION_KEY", "c2hvcnQ=")], &[], FERNET);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("GRYT_ENCRYPTION_KEY must be 32 bytes"));
    assert!(!text(&out.stderr).contains("c2hvcnQ="));

    let out = verify(&[("GRYT_ENCRYPTION_KEY", KEY)], &[], "\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no token"));
}
