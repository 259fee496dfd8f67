//! Token decryption on arbitrary strings with a fixed key, key parsing on arbitrary strings, and
//! an AES-256-GCM round trip of the input (so the success, `NotUtf8` and tampered paths are
//! reached too, not only the early refusals). Nothing panics; a token opens only with its key.
#![no_main]

use std::sync::LazyLock;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gryt_agent::secrets::{Scheme, TokenError, TokenKeys};
use libfuzzer_sys::fuzz_target;
use secrecy::{ExposeSecret, SecretString};

/// The key of the shared test vectors (`../shared/vectors/token-crypto.json`); the seeds hold
/// tokens made with it.
const KEY_B64: &str = "IpHYzcMQQR5+wnN4pmHJNRh8B+TVY26bw8QAsnJEuM0=";
/// Another valid key, to check a token never opens with the wrong one.
const OTHER_KEY_B64: &str = "jOGzxqy8XxZwqYIbxymF12RefbsHeAtOtNn7nZeUZKU=";

/// `decrypt` refuses anything over 64 KiB before decoding; a little more lets the fuzzer reach
/// that refusal, and no more keeps the work per run bounded.
const MAX_INPUT: usize = 64 * 1024 + 16;

static KEYS: LazyLock<TokenKeys> =
    LazyLock::new(|| TokenKeys::new(&SecretString::from(KEY_B64), None).unwrap());
static KEY: LazyLock<[u8; 32]> =
    LazyLock::new(|| STANDARD.decode(KEY_B64).unwrap().try_into().unwrap());

fn gcm_token(key: &[u8; 32], nonce: [u8; 12], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let mut buf = plaintext.to_vec();
    let tag = cipher
        .encrypt_inout_detached(&nonce.into(), &[], buf.as_mut_slice().into())
        .unwrap();
    let mut token = nonce.to_vec();
    token.extend_from_slice(&buf);
    token.extend_from_slice(&tag);
    token
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let text = String::from_utf8_lossy(data);

    // 1. The input as a token.
    match KEYS.decrypt(&text) {
        Ok(d) => assert!(!d.used_previous_key),
        Err(e) => {
            let _ = e.to_string();
        }
    }

    // 2. The input as a key, current and previous.
    let secret = SecretString::from(text.as_ref());
    if let Ok(keys) = TokenKeys::new(&secret, None) {
        // A key that parses is one that works: a token made with the fixed key opens with it
        // only when both are the same 32 bytes.
        let token = STANDARD.encode(gcm_token(&KEY, [7; 12], b"ghp_fuzz"));
        let same = keys.decrypt(&token).is_ok();
        let keys_prev = TokenKeys::new(&SecretString::from(OTHER_KEY_B64), Some(&secret)).unwrap();
        match keys_prev.decrypt(&token) {
            Ok(d) => assert!(same && d.used_previous_key),
            Err(e) => assert!(!same && e == TokenError::NotAuthentic, "{e}"),
        }
    }
    let _ = TokenKeys::new(&SecretString::from(KEY_B64), Some(&secret));

    // 3. The input as a plaintext, sealed with the fixed key: it opens to itself (or is refused
    // as not UTF-8), with either base64 alphabet; a flipped bit makes it not authentic.
    if data.len() <= 4096 {
        let mut nonce = [0u8; 12];
        for (n, b) in nonce.iter_mut().zip(data.iter().rev()) {
            *n = *b;
        }
        let token = gcm_token(&KEY, nonce, data);
        for encoded in [STANDARD.encode(&token), URL_SAFE_NO_PAD.encode(&token)] {
            match (KEYS.decrypt(&encoded), std::str::from_utf8(data)) {
                (Ok(d), Ok(plain)) => {
                    assert_eq!(d.scheme, Scheme::AesGcm);
                    assert_eq!(d.plaintext.expose_secret(), plain);
                }
                (Err(TokenError::NotUtf8), Err(_)) => {}
                (other, _) => panic!("a good GCM token gave {:?}", other.map(|d| d.scheme)),
            }
        }
        let bit = data.first().copied().unwrap_or(0) as usize % (token.len() * 8);
        let mut tampered = token;
        tampered[bit / 8] ^= 1 << (bit % 8);
        // A tampered GCM token could only open as Fernet by forging an HMAC: never.
        assert_eq!(
            KEYS.decrypt(&STANDARD.encode(&tampered)).map(|d| d.scheme),
            Err(TokenError::NotAuthentic)
        );
    }
});
