//! Secrets the agent handles: the encrypted GitHub token it must open, and every secret value it
//! must keep out of job output and its own logs.
//!
//! `token` decrypts `github_token_encrypted` with the key shared with the main API.

pub mod token;

pub use token::{Decrypted, KeyError, Scheme, TokenError, TokenKeys};
