//! Which modes the settings configure: pull (`api_url` set) and push (`push.enabled`). The one
//! place that says so, for start-up, pull mode and `gryt-agent check`.

use secrecy::{ExposeSecret, SecretString};

use crate::config::Settings;

/// The documented minimum length of the push-mode API key.
pub const MIN_PUSH_KEY_LEN: usize = 32;

/// The modes these settings turn on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modes {
    /// The API to lease jobs from: pull mode is on exactly when it is set.
    pub pull_url: Option<String>,
    /// Push mode: the API posts jobs to `POST /jobs/execute`.
    pub push: bool,
}

/// What the configured modes lack in the API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// Pull mode has no key at all.
    Pull,
    /// Push mode's key is shorter than [`MIN_PUSH_KEY_LEN`].
    Push,
    /// Push mode's previous key is set but shorter than [`MIN_PUSH_KEY_LEN`].
    PreviousPush,
}

impl Modes {
    pub fn of(settings: &Settings) -> Self {
        Modes {
            pull_url: settings.api_url.clone(),
            push: settings.push.enabled,
        }
    }

    pub fn pull(&self) -> bool {
        self.pull_url.is_some()
    }

    /// True when neither mode is on: the agent has nothing to do.
    pub fn none(&self) -> bool {
        !self.pull() && !self.push
    }

    /// What the keys lack for these modes, the push key's length first (start-up reports the
    /// first; `check` reports each).
    pub fn key_problems(
        &self,
        key: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Vec<KeyProblem> {
        let len = |k: Option<&SecretString>| k.map(|k| k.expose_secret().len()).unwrap_or(0);
        let (key_len, previous_len) = (len(key), len(previous));
        let mut problems = Vec::new();
        if self.push && key_len < MIN_PUSH_KEY_LEN {
            problems.push(KeyProblem::Push);
        }
        if self.pull() && key_len == 0 {
            problems.push(KeyProblem::Pull);
        }
        if self.push && previous_len > 0 && previous_len < MIN_PUSH_KEY_LEN {
            problems.push(KeyProblem::PreviousPush);
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_their_key_problems() {
        let mut settings = Settings::default();
        assert!(Modes::of(&settings).none());
        settings.api_url = Some("https://api.example".into());
        settings.push.enabled = true;
        let modes = Modes::of(&settings);
        assert!(modes.pull() && modes.push && !modes.none());
        let short = SecretString::from("short".to_owned());
        let long = SecretString::from("k".repeat(MIN_PUSH_KEY_LEN));
        assert_eq!(
            modes.key_problems(None, None),
            [KeyProblem::Push, KeyProblem::Pull]
        );
        assert_eq!(modes.key_problems(Some(&short), None), [KeyProblem::Push]);
        assert_eq!(
            modes.key_problems(Some(&long), Some(&short)),
            [KeyProblem::PreviousPush]
        );
        assert!(modes.key_problems(Some(&long), Some(&long)).is_empty());
    }
}
