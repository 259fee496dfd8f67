//! Which environment variables hold secrets: case-insensitive glob patterns on their names
//! (`secret_env_patterns`, `*TOKEN*` and the like by default).

use globset::{GlobSet, GlobSetBuilder};

/// The setting's default and how one of its patterns compiles are the settings' own.
pub use crate::config::{DEFAULT_SECRET_ENV_PATTERNS, secret_name_glob as glob};

/// Case-insensitive glob patterns naming environment variables whose values are secrets.
#[derive(Debug, Clone)]
pub struct SecretNames {
    set: GlobSet,
}

impl SecretNames {
    /// Fails on the first pattern that is not a valid glob.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, globset::Error> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(glob(pattern.as_ref())?.glob().clone());
        }
        Ok(SecretNames {
            set: builder.build()?,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// The values of the variables in `env` whose names match: what to hand to [`Masker::new`].
    pub fn secret_values<'a, I, K, V>(&'a self, env: I) -> impl Iterator<Item = &'a str> + 'a
    where
        I: IntoIterator<Item = (&'a K, &'a V)> + 'a,
        K: AsRef<str> + ?Sized + 'a,
        V: AsRef<str> + ?Sized + 'a,
    {
        env.into_iter()
            .filter(|(name, _)| self.matches(name.as_ref()))
            .map(|(_, value)| value.as_ref())
    }
}

/// Whether `name` matches any of `patterns` (case-insensitive globs such as `*TOKEN*`). A pattern
/// that does not compile matches nothing; settings are validated when loaded, so none should
/// get here. Compiles the patterns on every call: for many names, build a [`SecretNames`] once.
pub fn is_secret_name(name: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .filter_map(|p| glob(p).ok())
        .any(|g| g.is_match(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        let defaults: Vec<String> = DEFAULT_SECRET_ENV_PATTERNS
            .iter()
            .map(|p| p.to_string())
            .collect();
        for name in [
            "GITHUB_TOKEN",
            "api_key",
            "DbPassword",
            "MY_SECRET_THING",
            "KEY",
        ] {
            assert!(is_secret_name(name, &defaults), "{name}");
        }
        for name in ["PATH", "HOME", "CI", "TOKE"] {
            assert!(!is_secret_name(name, &defaults), "{name}");
        }
        assert!(!is_secret_name("GITHUB_TOKEN", &[]));
        assert!(!is_secret_name("X", &["[".to_string()]));

        let names = SecretNames::new(DEFAULT_SECRET_ENV_PATTERNS).unwrap();
        let env: std::collections::BTreeMap<String, String> = [
            ("NPM_TOKEN".to_string(), "npm-value".to_string()),
            ("PATH".to_string(), "/usr/bin".to_string()),
        ]
        .into();
        assert_eq!(names.secret_values(&env).collect::<Vec<_>>(), ["npm-value"]);
        assert!(SecretNames::new(&["[unclosed"][..]).is_err());
    }
}
