//! Token decryption against the shared test vectors (made with Python's `cryptography`, as the
//! main API uses it) and against tokens damaged, re-encoded or encrypted here.

use std::path::{Path, PathBuf};

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use gryt_agent::secrets::token::MAX_TOKEN_LEN;
use gryt_agent::secrets::{Scheme, TokenError, TokenKeys};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

const FAILURE: &str = "token could not be decrypted with GRYT_ENCRYPTION_KEY";

#[derive(Debug, Deserialize)]
struct Vectors {
    valid: Vec<Valid>,
    invalid: Vec<Invalid>,
}

#[derive(Debug, Deserialize)]
struct Valid {
    scheme: String,
    key: String,
    token: String,
    plaintext: String,
}

#[derive(Debug, Deserialize)]
struct Invalid {
    key: String,
    token: String,
    why: String,
}

/// The repository's copy, and the shared one beside the repository when there is one (it may
/// have gained vectors since the copy was taken).
fn vector_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("tests/data/token-crypto.json")];
    let shared = root.join("../shared/vectors/token-crypto.json");
    if shared.exists() {
        files.push(shared);
    }
    files
}

fn load(path: &Path) -> Vectors {
    let text = std::fs::read_to_string(path).unwrap();
    let vectors: Vectors = serde_json::from_str(&text).unwrap();
    assert!(!vectors.valid.is_empty() && !vectors.invalid.is_empty());
    vectors
}

fn vectors() -> Vectors {
    load(&vector_files()[0])
}

fn keys(key: &str) -> TokenKeys {
    TokenKeys::new(&SecretString::from(key), None).unwrap()
}

fn scheme_name(scheme: Scheme) -> String {
    scheme.to_string()
}

fn assert_rejected(keys: &TokenKeys, token: &str, context: &str) -> TokenError {
    let err = match keys.decrypt(token) {
        Ok(d) => panic!("{context}: decrypted to a {} token", d.scheme),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(message.starts_with(FAILURE), "{context}: {message}");
    if token.len() > 8 {
        assert!(!message.contains(token), "{context}: {message}");
    }
    err
}

#[test]
fn every_vector_in_every_copy() {
    for path in vector_files() {
        let v = load(&path);
        for (i, case) in v.valid.iter().enumerate() {
            let d = keys(&case.key)
                .decrypt(&case.token)
                .unwrap_or_else(|e| panic!("{}: valid[{i}]: {e}", path.display()));
            assert_eq!(d.plaintext.expose_secret(), case.plaintext, "valid[{i}]");
            assert_eq!(scheme_name(d.scheme), case.scheme, "valid[{i}]");
            assert!(!d.used_previous_key);
        }
        for (i, case) in v.invalid.iter().enumerate() {
            let context = format!("{}: invalid[{i}] ({})", path.display(), case.why);
            assert_rejected(&keys(&case.key), &case.token, &context);
        }
    }
}

fn decode_any(text: &str) -> Vec<u8> {
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    engine.decode(text).unwrap()
}

#[test]
fn keys_in_either_alphabet_with_or_without_padding() {
    for case in vectors().valid {
        let raw = decode_any(&case.key);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let key = engine.encode(&raw);
            let d = keys(&key).decrypt(&case.token).unwrap();
            assert_eq!(d.plaintext.expose_secret(), case.plaintext);
        }
    }
}

#[test]
fn tokens_in_either_alphabet_with_or_without_padding() {
    for case in vectors().valid {
        let raw = decode_any(&case.token);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let token = engine.encode(&raw);
            let d = keys(&case.key).decrypt(&format!("\n{token} \n")).unwrap();
            assert_eq!(d.plaintext.expose_secret(), case.plaintext);
        }
    }
}

#[test]
fn a_flipped_byte_in_any_part_is_rejected() {
    for case in vectors().valid {
        let raw = decode_any(&case.token);
        let n = raw.len();
        let parts: &[(&str, usize)] = if case.scheme == "fernet" {
            &[
                ("version", 0),
                ("timestamp", 5),
                ("iv", 9),
                ("iv", 24),
                ("ciphertext", 25),
                ("ciphertext", n - 33),
                ("hmac", n - 32),
                ("hmac", n - 1),
            ]
        } else {
            &[
                ("nonce", 0),
                ("nonce", 11),
                ("ciphertext", 12),
                ("ciphertext", n - 17),
                ("tag", n - 16),
                ("tag", n - 1),
            ]
        };
        let k = keys(&case.key);
        for &(part, at) in parts {
            for bit in [0x01, 0x80] {
                let mut bad = raw.clone();
                bad[at] ^= bit;
                let context = format!("{} {part} byte {at}", case.scheme);
                let err = assert_rejected(&k, &URL_SAFE.encode(&bad), &context);
                assert_eq!(err, TokenError::NotAuthentic, "{context}");
            }
        }
        // Cut short or lengthened.
        assert_rejected(&k, &URL_SAFE.encode(&raw[..n - 1]), "truncated");
        let mut longer = raw.clone();
        longer.push(0);
        assert_rejected(&k, &URL_SAFE.encode(&longer), "extended");
    }
}

#[test]
fn a_wrong_key_is_rejected() {
    let v = vectors();
    let other = "Ry16zsu02wzJNq2kFt1jH6tyS66Cf+dkHZvaehsmYp0=";
    for case in &v.valid {
        assert_rejected(&keys(other), &case.token, "wrong key");
    }
}

#[test]
fn the_previous_key_opens_tokens_during_a_rotation() {
    let other = SecretString::from("Ry16zsu02wzJNq2kFt1jH6tyS66Cf+dkHZvaehsmYp0=");
    for case in vectors().valid {
        let key = SecretString::from(case.key.as_str());
        let rotated = TokenKeys::new(&other, Some(&key)).unwrap();
        let d = rotated.decrypt(&case.token).unwrap();
        assert!(d.used_previous_key);
        assert_eq!(d.plaintext.expose_secret(), case.plaintext);

        let current = TokenKeys::new(&key, Some(&other)).unwrap();
        assert!(!current.decrypt(&case.token).unwrap().used_previous_key);

        let neither = TokenKeys::new(&other, Some(&other)).unwrap();
        assert_rejected(&neither, &case.token, "neither key");
    }
}

#[test]
fn garbage_empty_and_huge_tokens_are_rejected() {
    let k = keys("IpHYzcMQQR5+wnN4pmHJNRh8B+TVY26bw8QAsnJEuM0=");
    assert_eq!(assert_rejected(&k, "", "empty"), TokenError::Empty);
    assert_eq!(assert_rejected(&k, " \n\t", "blank"), TokenError::Empty);
    for garbage in ["not-base64-@@@", "gAAAA!", "ab+-cd", "=====", "a", "üñï"] {
        assert_rejected(&k, garbage, garbage);
    }
    for short in ["c2hvcnQ=", "gA==", "AAAA"] {
        assert_eq!(assert_rejected(&k, short, short), TokenError::NotAuthentic);
    }
    let huge = "A".repeat(MAX_TOKEN_LEN + 1);
    assert_eq!(assert_rejected(&k, &huge, "huge"), TokenError::TooLong);
    let largest = "A".repeat(MAX_TOKEN_LEN);
    assert_eq!(
        assert_rejected(&k, &largest, "largest"),
        TokenError::NotAuthentic
    );
}

const KEY: [u8; 32] = *b"0123456789abcdef0123456789ABCDEF";

fn fernet_encrypt(key: &[u8; 32], timestamp: u64, plaintext: &[u8]) -> String {
    let iv = [7u8; 16];
    let mut buf = vec![0u8; plaintext.len() + 16];
    buf[..plaintext.len()].copy_from_slice(plaintext);
    let ciphertext = cbc::Encryptor::<aes::Aes128>::new_from_slices(&key[16..], &iv)
        .unwrap()
        .encrypt_padded::<Pkcs7>(&mut buf, plaintext.len())
        .unwrap()
        .to_vec();
    let mut token = vec![0x80];
    token.extend_from_slice(&timestamp.to_be_bytes());
    token.extend_from_slice(&iv);
    token.extend_from_slice(&ciphertext);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key[..16]).unwrap();
    mac.update(&token);
    token.extend_from_slice(&mac.finalize().into_bytes());
    URL_SAFE.encode(token)
}

fn gcm_encrypt(key: &[u8; 32], nonce: [u8; 12], plaintext: &[u8]) -> String {
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let sealed = cipher.encrypt(&nonce.into(), plaintext).unwrap();
    STANDARD.encode([&nonce[..], &sealed].concat())
}

#[test]
fn fernet_timestamps_are_not_checked() {
    // Python's `Fernet.decrypt` without a TTL accepts any timestamp; an agent whose clock lags
    // the API's must too.
    let k = keys(&STANDARD.encode(KEY));
    for timestamp in [0, 1, u64::MAX, u64::MAX / 2] {
        let d = k
            .decrypt(&fernet_encrypt(&KEY, timestamp, b"gho_timestamped"))
            .unwrap();
        assert_eq!(d.scheme, Scheme::Fernet);
        assert_eq!(d.plaintext.expose_secret(), "gho_timestamped");
    }
}

#[test]
fn a_gcm_token_that_looks_like_fernet_still_opens() {
    // One nonce in 256 starts with Fernet's version byte: the trial must go on to AES-GCM.
    let k = keys(&URL_SAFE_NO_PAD.encode(KEY));
    let token = gcm_encrypt(&KEY, [0x80; 12], b"ghp_nonce_0x80");
    let d = k.decrypt(&token).unwrap();
    assert_eq!(d.scheme, Scheme::AesGcm);
    assert_eq!(d.plaintext.expose_secret(), "ghp_nonce_0x80");
}

#[test]
fn empty_plaintexts_decrypt_and_non_utf8_ones_are_refused() {
    let k = keys(&STANDARD.encode(KEY));
    assert_eq!(
        k.decrypt(&fernet_encrypt(&KEY, 1, b""))
            .unwrap()
            .plaintext
            .expose_secret(),
        ""
    );
    assert_eq!(
        k.decrypt(&gcm_encrypt(&KEY, [1; 12], b""))
            .unwrap()
            .plaintext
            .expose_secret(),
        ""
    );
    let err = assert_rejected(&k, &fernet_encrypt(&KEY, 1, b"\xff\xfe"), "non-UTF-8");
    assert_eq!(err, TokenError::NotUtf8);
    let err = assert_rejected(&k, &gcm_encrypt(&KEY, [2; 12], b"\xc3"), "non-UTF-8");
    assert_eq!(err, TokenError::NotUtf8);
}
