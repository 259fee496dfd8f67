//! Pure rules of artifacts and caches: which paths and keys a job may ask for, and where in the
//! bucket a cache of a given repository, branch and key lives. No I/O here.

use sha2::{Digest, Sha256};

use crate::wire::{ArtifactsSpec, CacheSpec, JobSpec};

/// Most patterns in one `artifacts.paths`, `cache[].paths` or `cache[].files`.
pub const MAX_PATTERNS: usize = 100;
/// Most caches one job may have.
pub const MAX_CACHES: usize = 16;
/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Longest cache key accepted.
pub const MAX_KEY_LEN: usize = 64;

/// What a job asks of the store: its artifacts (if any) and its caches, from the job spec or,
/// when the spec gives none, from its YAML pipeline (`Pipeline::storage_wanted`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    pub artifacts: Option<ArtifactsSpec>,
    pub caches: Vec<CacheSpec>,
}

/// A bad field: its path (`artifacts.paths[0]`) and what is wrong.
pub type FieldError = (String, String);

fn bad(field: String, message: impl Into<String>) -> FieldError {
    (field, message.into())
}

/// True when the pattern has glob characters.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// A workspace-relative path or glob: not empty, not absolute, no `..`, no NUL.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!("longer than {MAX_PATTERN_LEN} bytes"));
    }
    if pattern.contains(['\0', '\\']) {
        return Err("must not contain NUL or `\\`".into());
    }
    if pattern.starts_with('/') {
        return Err(format!(
            "`{pattern}` is absolute: paths are relative to the workspace"
        ));
    }
    if pattern.split('/').any(|part| part == "..") {
        return Err(format!("`{pattern}` leaves the workspace (`..`)"));
    }
    if is_glob(pattern) {
        glob(pattern).map_err(|e| format!("`{pattern}` is not a valid glob: {e}"))?;
    }
    Ok(())
}

/// The matcher of a glob pattern: `*` stays within one path component, `**` spans several.
pub fn glob(pattern: &str) -> Result<globset::GlobMatcher, globset::Error> {
    Ok(globset::GlobBuilder::new(normalize(pattern).as_str())
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

/// A pattern without `./` components, doubled or trailing slashes.
pub fn normalize(pattern: &str) -> String {
    pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn check_list(field: &str, patterns: &[String], globs: bool) -> Result<(), FieldError> {
    if patterns.len() > MAX_PATTERNS {
        return Err(bad(
            field.into(),
            format!("more than {MAX_PATTERNS} entries"),
        ));
    }
    for (i, p) in patterns.iter().enumerate() {
        let at = format!("{field}[{i}]");
        check_pattern(p).map_err(|m| bad(at.clone(), m))?;
        if !globs && is_glob(p) {
            return Err(bad(at, format!("`{p}`: globs are not allowed here")));
        }
        if normalize(p).is_empty() {
            return Err(bad(at, "names the workspace itself"));
        }
    }
    Ok(())
}

/// Validates `artifacts` (field paths start with `artifacts`).
pub fn check_artifacts(artifacts: &ArtifactsSpec) -> Result<(), FieldError> {
    if artifacts.paths.is_empty() {
        return Err(bad("artifacts.paths".into(), "needs at least one path"));
    }
    check_list("artifacts.paths", &artifacts.paths, true)
}

/// Validates `cache` (field paths start with `cache`).
pub fn check_caches(caches: &[CacheSpec]) -> Result<(), FieldError> {
    if caches.len() > MAX_CACHES {
        return Err(bad(
            "cache".into(),
            format!("more than {MAX_CACHES} caches"),
        ));
    }
    for (i, cache) in caches.iter().enumerate() {
        let key = &cache.key;
        let valid = (1..=MAX_KEY_LEN).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !key.starts_with('.');
        if !valid {
            return Err(bad(
                format!("cache[{i}].key"),
                format!(
                    "use 1-{MAX_KEY_LEN} characters from [A-Za-z0-9._-], not starting with `.`"
                ),
            ));
        }
        if caches[..i].iter().any(|c| c.key == *key) {
            return Err(bad(
                format!("cache[{i}].key"),
                format!("`{key}` is used twice"),
            ));
        }
        if cache.paths.is_empty() {
            return Err(bad(format!("cache[{i}].paths"), "needs at least one path"));
        }
        check_list(&format!("cache[{i}].paths"), &cache.paths, false)?;
        check_list(&format!("cache[{i}].files"), &cache.files, true)?;
    }
    Ok(())
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A readable, safe object-path component for `text`: its plain characters (at most 40) and a
/// hash of the whole, so two different texts never share a label.
fn label(text: &str) -> String {
    let plain: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = hex(&Sha256::digest(text.as_bytes()))[..16].to_owned();
    format!("{}-{hash}", plain.trim_start_matches('.'))
}

/// The repository of a job, as the cache scope names it: `git_url` without a trailing `/` or
/// `.git`, case-folded; `no-repo` when the job has none.
fn repository(job: &JobSpec) -> String {
    let Some(url) = job
        .git_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return "no-repo".into();
    };
    let url = url.trim_end_matches('/').to_ascii_lowercase();
    label(url.strip_suffix(".git").unwrap_or(&url))
}

/// Where a job's caches are read and written. The rule: a cache belongs to one repository
/// and one branch. A trusted job reads its branch's scope, then (on a miss) the default
/// branch's, and writes its branch's scope. An untrusted job reads only the default branch's
/// scope and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheScopes {
    /// Scopes read, in order, until one holds the key.
    pub read: Vec<String>,
    /// The scope written after a successful job, if any.
    pub write: Option<String>,
}

pub fn cache_scopes(job: &JobSpec) -> CacheScopes {
    let repo = repository(job);
    let default = format!("{repo}/{}", label(JobSpec::DEFAULT_BRANCH));
    if !job.trusted {
        return CacheScopes {
            read: vec![default],
            write: None,
        };
    }
    let own = format!("{repo}/{}", label(job.branch()));
    let mut read = vec![own.clone()];
    if own != default {
        read.push(default);
    }
    CacheScopes {
        read,
        write: Some(own),
    }
}

/// The cache's name in a scope: `<key>-<hash>.tar.zst`, where the hash covers the cache's
/// paths and the contents of its key files (`files`: relative path and SHA-256 of each, in
/// path order; a pattern that matched nothing is part of the hash too).
pub fn cache_object_name(cache: &CacheSpec, files: &[(String, [u8; 32])]) -> String {
    let mut hash = Sha256::new();
    for p in &cache.paths {
        hash.update(normalize(p).as_bytes());
        hash.update([0]);
    }
    hash.update([1]);
    for (path, digest) in files {
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(digest);
    }
    format!("{}-{}.tar.zst", cache.key, &hex(&hash.finalize())[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(url: Option<&str>, branch: Option<&str>, trusted: bool) -> JobSpec {
        JobSpec {
            git_url: url.map(str::to_owned),
            git_branch: branch.map(str::to_owned),
            trusted,
            ..Default::default()
        }
    }

    #[test]
    fn patterns_stay_in_the_workspace() {
        for ok in ["dist/", "reports/*.xml", "./a/b", "**/*.log", ".cargo-home"] {
            check_pattern(ok).unwrap();
        }
        for bad in ["", "/etc", "../x", "a/../../b", "a/..", "a\\b", "a[", "x\0"] {
            assert!(check_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_keep_repositories_and_branches_apart() {
        let a_main = cache_scopes(&job(Some("https://git.example/a.git"), None, true));
        let a_main2 = cache_scopes(&job(Some("https://git.example/A/"), Some("main"), true));
        let b_main = cache_scopes(&job(Some("https://git.example/b"), None, true));
        assert_eq!(a_main.write, a_main2.write, "same repository, same branch");
        assert_ne!(a_main.write, b_main.write, "other repository");
        assert_eq!(a_main.read, [a_main.write.clone().unwrap()]);

        let a_feature = cache_scopes(&job(Some("https://git.example/a"), Some("feat/x"), true));
        assert_ne!(a_feature.write, a_main.write);
        assert_eq!(
            a_feature.read[1],
            a_main.write.clone().unwrap(),
            "falls back to main"
        );

        let untrusted = cache_scopes(&job(Some("https://git.example/a"), Some("main"), false));
        assert_eq!(untrusted.write, None, "untrusted jobs never write");
        assert_eq!(untrusted.read, [a_main.write.unwrap()]);
    }

    #[test]
    fn the_cache_name_follows_key_files_and_paths() {
        let cache = CacheSpec {
            key: "deps".into(),
            files: vec!["Cargo.lock".into()],
            paths: vec!["target".into()],
        };
        let one = cache_object_name(&cache, &[("Cargo.lock".into(), [1; 32])]);
        let two = cache_object_name(&cache, &[("Cargo.lock".into(), [2; 32])]);
        assert!(
            one.starts_with("deps-") && one.ends_with(".tar.zst"),
            "{one}"
        );
        assert_ne!(one, two);
        let other_paths = CacheSpec {
            paths: vec!["vendor".into()],
            ..cache.clone()
        };
        assert_ne!(
            one,
            cache_object_name(&other_paths, &[("Cargo.lock".into(), [1; 32])])
        );
    }

    #[test]
    fn cache_keys_are_plain() {
        let cache = |key: &str| CacheSpec {
            key: key.into(),
            files: vec![],
            paths: vec!["x".into()],
        };
        check_caches(&[cache("deps-1.2_x")]).unwrap();
        for bad in ["", "a/b", "..", ".hidden", &"k".repeat(65)] {
            assert!(check_caches(&[cache(bad)]).is_err(), "{bad:?}");
        }
        assert!(check_caches(&[cache("a"), cache("a")]).is_err());
    }
}
