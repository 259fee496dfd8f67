//! The integration tests, in one test binary: the crate is linked once, not once per suite.
//! Each suite is a module (`cargo test --test it pull::` runs the pull suite); `support` and
//! the conformance fake of the API (`fake_api`) are shared by them.
//!
//! The suites run in one process, so none may change what the process shares (environment,
//! current directory, signal handlers): children get their environment passed, not inherited
//! from a `set_var`. Raising the descriptor limit (`agent::`) only ever raises it.

mod fake_api;
mod support;

mod adopt;
mod agent;
mod bad_input;
mod checkout;
mod cli_exec;
mod conformance;
mod crash;
mod engine_restart;
mod executor;
mod gc;
mod hand_over;
mod network;
mod pull;
mod pull_hostile;
mod push;
mod push_adopt;
mod readiness;
mod secrets_leak;
mod services;
mod soak;
mod store;
mod token_cli;
mod token_crypto;
mod warm;
