//! `gryt-agent token verify`: checks that this agent's key opens a token the API made.
//!
//! Reads the token on standard input so it stays out of the process list and shell history.
//! Prints what it learned but never the plaintext, unless `--reveal` asks for exactly that.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use gryt_agent::config::Settings;
use gryt_agent::secrets::token::MAX_TOKEN_LEN;
use gryt_agent::secrets::{TokenKeys, register_global_secret};
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Decrypt a token read on stdin with the configured GRYT_ENCRYPTION_KEY (and
    /// GRYT_ENCRYPTION_KEY_PREVIOUS); report its scheme, length and which key opened it.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Print only the decrypted plaintext (and a newline) on stdout
    #[arg(long)]
    pub reveal: bool,
}

pub fn run(config: Option<&Path>, args: TokenArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TokenCommand::Verify(args) => verify(config, args),
    }
}

fn verify(config: Option<&Path>, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config, &[])?;
    for key in [
        settings.encryption_key()?,
        settings.encryption_key_previous.clone(),
    ]
    .into_iter()
    .flatten()
    {
        register_global_secret(key);
    }
    let Some(keys) = TokenKeys::from_settings(&settings)? else {
        bail!(
            "no token key is configured: set GRYT_ENCRYPTION_KEY (or GRYT_ENCRYPTION_KEY_FILE, or \
             `encryption_key` in the settings file) to the main API's encryption key"
        );
    };
    let token = read_token()?;
    let decrypted = keys.decrypt(&token)?;
    register_global_secret(decrypted.plaintext.clone());

    let mut out = std::io::stdout().lock();
    if args.reveal {
        writeln!(out, "{}", decrypted.plaintext.expose_secret())?;
    } else {
        writeln!(out, "scheme: {}", decrypted.scheme)?;
        writeln!(
            out,
            "plaintext length: {}",
            decrypted.plaintext.expose_secret().len()
        )?;
        let key = if decrypted.used_previous_key {
            "previous"
        } else {
            "current"
        };
        writeln!(out, "key: {key}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Stdin, trimmed; read with a bound so a stray pipe of a large file fails fast.
fn read_token() -> anyhow::Result<Zeroizing<String>> {
    let mut token = Zeroizing::new(String::new());
    std::io::stdin()
        .take(MAX_TOKEN_LEN as u64 + 1024)
        .read_to_string(&mut token)
        .context("cannot read the token from standard input (is it UTF-8 text?)")?;
    if token.trim().is_empty() {
        bail!("no token on standard input: pipe the encrypted token in");
    }
    Ok(Zeroizing::new(token.trim().to_owned()))
}
