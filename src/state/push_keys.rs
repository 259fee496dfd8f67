//! Checking push requests' `X-API-Key` against the agent's keys, in constant time.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// The keys a push request may present: the current one and, during a rotation, the previous.
pub struct PushKeys {
    current: SecretString,
    previous: Option<SecretString>,
}

impl PushKeys {
    pub fn new(current: SecretString, previous: Option<SecretString>) -> Self {
        let previous = previous.filter(|p| !p.expose_secret().is_empty());
        PushKeys { current, previous }
    }

    /// True when `presented` equals one of the keys. Both keys are always compared, so the time
    /// taken does not tell which (if any) matched; only the length can differ.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let current = presented.ct_eq(self.current.expose_secret().as_bytes());
        let previous = match &self.previous {
            Some(p) => presented.ct_eq(p.expose_secret().as_bytes()),
            None => subtle::Choice::from(0),
        };
        bool::from(current | previous)
    }

    /// True when `presented` is the previous key (not the current one), in constant time like
    /// [`PushKeys::accepts`]: a job's callback goes with the key its caller presented.
    pub fn is_previous(&self, presented: &[u8]) -> bool {
        let current = presented.ct_eq(self.current.expose_secret().as_bytes());
        let previous = match &self.previous {
            Some(p) => presented.ct_eq(p.expose_secret().as_bytes()),
            None => subtle::Choice::from(0),
        };
        bool::from(!current & previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_previous_keys_are_accepted() {
        let keys = PushKeys::new("current-key".into(), Some("previous-key".into()));
        assert!(keys.accepts(b"current-key"));
        assert!(keys.accepts(b"previous-key"));
        assert!(!keys.accepts(b"current-ke"));
        assert!(!keys.accepts(b""));
        assert!(keys.is_previous(b"previous-key"));
        assert!(!keys.is_previous(b"current-key") && !keys.is_previous(b"other"));
        let keys = PushKeys::new("current-key".into(), Some("".into()));
        assert!(!keys.accepts(b""));
        assert!(!keys.is_previous(b""));
    }
}
