//! Secrets the agent handles: the encrypted GitHub token it must open, and every secret value it
//! must keep out of job output and its own logs.
//!
//! `token` decrypts `github_token_encrypted` with the key shared with the main API; `mask`
//! replaces known secret values with [`MASK`] in text, in streamed output, and in the agent's
//! tracing output.

pub mod mask;
pub mod token;

pub use mask::{
    DEFAULT_SECRET_ENV_PATTERNS, MASK, Masker, MaskingMakeWriter, StreamMasker, is_secret_name,
    register_global_secret,
};
pub use token::{Decrypted, KeyError, Scheme, TokenError, TokenKeys};
