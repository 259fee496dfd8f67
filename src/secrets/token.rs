//! Decrypts the `github_token_encrypted` the main API sends, with the key it shares with agents.
//!
//! Two formats are accepted, told apart by which one authenticates (never by guessing from the
//! text): Fernet, as the existing Python API writes it, and `base64(nonce[12] || ciphertext ||
//! tag[16])` AES-256-GCM, which newer APIs may send. Both use the same 32-byte key, given in
//! base64 of either alphabet because `openssl rand -base64 32` (the usual way to make it) gives
//! the standard one while Fernet tooling gives the URL-safe one. During a key rotation the
//! previous key is tried after the current one.
//!
//! Fernet is implemented here on RustCrypto's `aes`/`cbc`/`hmac`/`sha2` rather than through the
//! `fernet` crate: that crate (0.2, with `rustcrypto`) refuses every token whose timestamp is more
//! than 60 s ahead of the local clock, TTL or not, and checks it before the HMAC. Python's
//! `Fernet.decrypt` without a TTL checks no timestamp, so an agent whose clock lags the API's would
//! reject good tokens. The format is small enough that owning it costs less than that surprise.

use std::fmt;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit as _};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, KeyIvInit};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::{ConfigError, Settings};

/// Longest token accepted, checked before decoding: a GitHub token encrypts to a few hundred
/// bytes, so anything this large is not one and is not worth the work.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

const KEY_LEN: usize = 32;
/// Longest base64 text that can still be a 32-byte key (padding, a stray newline, slack).
const MAX_KEY_TEXT_LEN: usize = 64;

const FERNET_VERSION: u8 = 0x80;
/// Version byte, 64-bit timestamp, 128-bit IV.
const FERNET_HEADER_LEN: usize = 1 + 8 + 16;
const FERNET_HMAC_LEN: usize = 32;
const AES_BLOCK_LEN: usize = 16;

const GCM_NONCE_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;

/// Standard or URL-safe alphabet, padded or not: keys and tokens arrive in both.
const PADDING_OPTIONAL: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, PADDING_OPTIONAL);
const URL_SAFE_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, PADDING_OPTIONAL);

/// The two alphabets differ only in `+/` versus `-_`; a text holding either of the latter is
/// URL-safe, and one holding neither decodes the same in both.
fn engine_for(text: &str) -> &'static GeneralPurpose {
    if text.contains(['-', '_']) {
        &URL_SAFE_ANY_PAD
    } else {
        &STANDARD_ANY_PAD
    }
}

/// A configured key is unusable. The message names the setting and never shows the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{setting} must be 32 bytes in base64 (standard or URL-safe alphabet, as made by \
         `openssl rand -base64 32`): {problem}"
    )]
    Invalid {
        setting: &'static str,
        problem: &'static str,
    },
    #[error(
        "GRYT_ENCRYPTION_KEY_PREVIOUS is set but GRYT_ENCRYPTION_KEY is not: set the current key too"
    )]
    PreviousWithoutCurrent,
    #[error(transparent)]
    Settings(#[from] ConfigError),
}

/// A token did not decrypt. Every variant's message starts with the same sentence, which callers
/// and the API's operators can search for; the reason after the colon never holds token or key
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token could not be decrypted with GRYT_ENCRYPTION_KEY: the token is empty")]
    Empty,
    #[error(
        "token could not be decrypted with GRYT_ENCRYPTION_KEY: the token is over {MAX_TOKEN_LEN} bytes"
    )]
    TooLong,
    #[error("token could not be decrypted with GRYT_ENCRYPTION_KEY: the token is not base64")]
    NotBase64,
    #[error(
        "token could not be decrypted with GRYT_ENCRYPTION_KEY: not a Fernet or AES-256-GCM token \
         for the configured key(s)"
    )]
    NotAuthentic,
    #[error("token could not be decrypted with GRYT_ENCRYPTION_KEY: the plaintext is not UTF-8")]
    NotUtf8,
}

/// Which format a token turned out to be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Fernet,
    AesGcm,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Fernet => "fernet",
            Scheme::AesGcm => "aes-256-gcm",
        })
    }
}

/// A decrypted token. `plaintext` is zeroized when dropped and redacted in `Debug`.
#[derive(Debug)]
pub struct Decrypted {
    pub scheme: Scheme,
    pub plaintext: SecretString,
    /// The token only opened with `encryption_key_previous`: the API has not re-encrypted it yet.
    pub used_previous_key: bool,
}

type Key = Zeroizing<[u8; KEY_LEN]>;

/// The agent's token key(s): the current one and, during a rotation, the previous one.
pub struct TokenKeys {
    current: Key,
    previous: Option<Key>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys")
            .field("current", &"[redacted]")
            .field("previous", &self.previous.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl TokenKeys {
    pub fn new(current: &SecretString, previous: Option<&SecretString>) -> Result<Self, KeyError> {
        let current = parse_key(current, "GRYT_ENCRYPTION_KEY")?;
        let previous = previous
            .filter(|p| !p.expose_secret().trim().is_empty())
            .map(|p| parse_key(p, "GRYT_ENCRYPTION_KEY_PREVIOUS"))
            .transpose()?;
        Ok(TokenKeys { current, previous })
    }

    /// The keys the settings name; `None` when no key is configured at all.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, KeyError> {
        Self::from_keys(
            settings.encryption_key()?.as_ref(),
            settings.encryption_key_previous.as_ref(),
        )
    }

    /// The keys given; `None` when there is no current key. A previous key alone is an error;
    /// a blank previous key counts as none.
    pub fn from_keys(
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Result<Option<Self>, KeyError> {
        let previous = previous.filter(|p| !p.expose_secret().trim().is_empty());
        match current {
            Some(current) => Self::new(current, previous).map(Some),
            None if previous.is_some() => Err(KeyError::PreviousWithoutCurrent),
            None => Ok(None),
        }
    }

    /// Decrypts `token` (surrounding whitespace ignored) by trying each format with the current
    /// key, then with the previous one; the first that authenticates wins.
    pub fn decrypt(&self, token: &str) -> Result<Decrypted, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let data = engine_for(token)
            .decode(token)
            .map_err(|_| TokenError::NotBase64)?;
        let keys = std::iter::once((&self.current, false))
            .chain(self.previous.as_ref().map(|k| (k, true)));
        for (key, used_previous_key) in keys {
            let opened = fernet_decrypt(key, &data)
                .map(|p| (Scheme::Fernet, p))
                .or_else(|| gcm_decrypt(key, &data).map(|p| (Scheme::AesGcm, p)));
            if let Some((scheme, plaintext)) = opened {
                let text = std::str::from_utf8(&plaintext).map_err(|_| TokenError::NotUtf8)?;
                return Ok(Decrypted {
                    scheme,
                    // Copies into an exact-size allocation; `plaintext` is zeroized on drop.
                    plaintext: SecretString::from(text),
                    used_previous_key,
                });
            }
        }
        Err(TokenError::NotAuthentic)
    }
}

/// Decodes a key into zeroizing storage only: `decode_slice` writes into our buffer, so no
/// intermediate allocation is left holding key bytes.
fn parse_key(text: &SecretString, setting: &'static str) -> Result<Key, KeyError> {
    let invalid = |problem| KeyError::Invalid { setting, problem };
    let text = text.expose_secret().trim();
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.len() > MAX_KEY_TEXT_LEN {
        return Err(invalid("it is too long"));
    }
    let mut buf = Zeroizing::new([0u8; MAX_KEY_TEXT_LEN]);
    let len = engine_for(text)
        .decode_slice(text, &mut buf[..])
        .map_err(|_| invalid("it is not valid base64"))?;
    if len != KEY_LEN {
        return Err(invalid("it decodes to the wrong number of bytes"));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&buf[..KEY_LEN]);
    Ok(key)
}

/// Fernet: `0x80 || timestamp[8] || iv[16] || AES-128-CBC(PKCS7) ciphertext || HMAC-SHA256[32]`,
/// with the first half of the key signing and the second half encrypting. The HMAC is checked
/// before anything else is looked at; the timestamp is not checked at all (no TTL, as the API's
/// `Fernet.decrypt(token)` does not).
fn fernet_decrypt(key: &[u8; KEY_LEN], data: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if data.len() < FERNET_HEADER_LEN + AES_BLOCK_LEN + FERNET_HMAC_LEN {
        return None;
    }
    let (signed, tag) = data.split_at(data.len() - FERNET_HMAC_LEN);
    let (signing_key, encryption_key) = key.split_at(KEY_LEN / 2);
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_key).ok()?;
    mac.update(signed);
    mac.verify_slice(tag).ok()?;
    if signed[0] != FERNET_VERSION {
        return None;
    }
    let iv = &signed[1 + 8..FERNET_HEADER_LEN];
    let mut buf = Zeroizing::new(signed[FERNET_HEADER_LEN..].to_vec());
    let len = cbc::Decryptor::<aes::Aes128>::new_from_slices(encryption_key, iv)
        .ok()?
        .decrypt_padded::<Pkcs7>(&mut buf)
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// AES-256-GCM: `nonce[12] || ciphertext || tag[16]`, the whole key, no associated data.
fn gcm_decrypt(key: &[u8; KEY_LEN], data: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if data.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
        return None;
    }
    let (nonce, rest) = data.split_at(GCM_NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - GCM_TAG_LEN);
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    let nonce = aes_gcm::Nonce::try_from(nonce).ok()?;
    let tag = aes_gcm::Tag::try_from(tag).ok()?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    cipher
        .decrypt_inout_detached(&nonce, &[], buf.as_mut_slice().into(), &tag)
        .ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "IpHYzcMQQR5+wnN4pmHJNRh8B+TVY26bw8QAsnJEuM0=";

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    #[test]
    fn bad_keys_name_the_setting_and_never_echo_the_key() {
        for bad in [
            "",
            "short",
            "not base64 at all!!",
            "c2hvcnQ=",
            &"A".repeat(200),
        ] {
            let err = TokenKeys::new(&secret(bad), None).unwrap_err().to_string();
            assert!(
                err.starts_with("GRYT_ENCRYPTION_KEY must be 32 bytes in base64"),
                "{err}"
            );
            if !bad.is_empty() {
                assert!(!err.contains(bad), "{err}");
            }
        }
        let err = TokenKeys::new(&secret(KEY), Some(&secret("c2hvcnQ=")))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("GRYT_ENCRYPTION_KEY_PREVIOUS must be"),
            "{err}"
        );
    }

    #[test]
    fn keys_are_redacted_in_debug() {
        let keys = TokenKeys::new(&secret(KEY), Some(&secret(KEY))).unwrap();
        let debug = format!("{keys:?}");
        assert!(!debug.chars().any(|c| c.is_ascii_digit()), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }

    #[test]
    fn key_surrounded_by_whitespace_is_accepted() {
        TokenKeys::new(&secret(&format!("  {KEY}\n")), None).unwrap();
    }

    #[test]
    fn empty_previous_key_is_ignored() {
        let keys = TokenKeys::new(&secret(KEY), Some(&secret(" "))).unwrap();
        assert!(keys.previous.is_none());
    }

    #[test]
    fn from_settings() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let none = Settings::load_from(None, &[], &[]).unwrap();
        assert!(TokenKeys::from_settings(&none).unwrap().is_none());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, format!("{KEY}\n")).unwrap();
        let s = Settings::load_from(
            None,
            &env(&[("GRYT_ENCRYPTION_KEY_FILE", file.to_str().unwrap())]),
            &[],
        )
        .unwrap();
        let keys = TokenKeys::from_settings(&s).unwrap().unwrap();
        assert!(keys.previous.is_none());

        let s =
            Settings::load_from(None, &env(&[("GRYT_ENCRYPTION_KEY_PREVIOUS", KEY)]), &[]).unwrap();
        let err = TokenKeys::from_settings(&s).unwrap_err().to_string();
        assert!(err.contains("GRYT_ENCRYPTION_KEY is not"), "{err}");
    }

    #[test]
    fn scheme_display() {
        assert_eq!(Scheme::Fernet.to_string(), "fernet");
        assert_eq!(Scheme::AesGcm.to_string(), "aes-256-gcm");
    }
}
