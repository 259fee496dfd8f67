//! Resource guards: the free disk space and file descriptors below which the agent takes no new
//! job.
//!
//! A full disk or a descriptor table at its limit fails jobs in confusing ways (a clone that
//! stops halfway, a build that cannot write, a Docker call that cannot connect); it is better not
//! to take them and to say why on `/health`.

use std::path::Path;

/// Free bytes for unprivileged users on the filesystem holding `path` (its nearest existing
/// ancestor, so a work dir that is not created yet still has an answer).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let stat = rustix::fs::statvfs(existing)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Why the work dir cannot take a job now, if it cannot.
pub fn disk_problem(work_dir: &Path, min_free_mb: u64) -> Option<String> {
    if min_free_mb == 0 {
        return None;
    }
    let need = min_free_mb.saturating_mul(1024 * 1024);
    match free_bytes(work_dir) {
        Ok(free) if free >= need => None,
        Ok(free) => Some(format!(
            "only {} MiB free in the work dir {} (min_free_disk_mb = {min_free_mb}): taking no jobs",
            free / (1024 * 1024),
            work_dir.display()
        )),
        Err(e) => Some(format!(
            "cannot read the free space of the work dir {}: {e}",
            work_dir.display()
        )),
    }
}

/// Descriptors a job may need beyond what the agent holds (Docker connections, the log file,
/// the clone's pack files, the API client): fewer free than this and no job is taken.
pub const MIN_FREE_DESCRIPTORS: u64 = 64;

/// The soft `RLIMIT_NOFILE` of this process (`None`: unlimited).
pub fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (the endpoint's connections and the jobs
/// share the table; many systems start services at a soft 1024). Returns the soft limit now.
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the descriptor limit");
        }
    }
    descriptor_limit()
}

/// Descriptors this process has open (entries of `/proc/self/fd`, less the one reading it).
pub fn open_descriptors() -> std::io::Result<u64> {
    let count = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(count.saturating_sub(1))
}

/// Why the descriptor table cannot take a job now, if it cannot.
pub fn descriptor_problem() -> Option<String> {
    let limit = descriptor_limit()?;
    match open_descriptors() {
        Ok(open) if limit.saturating_sub(open) >= MIN_FREE_DESCRIPTORS => None,
        Ok(open) => Some(format!(
            "only {} of {limit} file descriptors free (RLIMIT_NOFILE; a job needs {MIN_FREE_DESCRIPTORS}): taking no jobs",
            limit.saturating_sub(open)
        )),
        // EMFILE itself: reading the table needs a descriptor.
        Err(e) => Some(format!(
            "cannot count the open file descriptors ({e}): taking no jobs"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_directory_has_free_space_and_an_impossible_minimum_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("not/yet/there")).unwrap() > 0);
        assert_eq!(disk_problem(dir.path(), 0), None);
        assert_eq!(disk_problem(dir.path(), 1), None);
        let problem = disk_problem(dir.path(), u64::MAX / (1024 * 1024)).unwrap();
        assert!(problem.contains("min_free_disk_mb"), "{problem}");
    }

    #[test]
    fn descriptors_are_counted_against_the_limit() {
        let open = open_descriptors().unwrap();
        assert!(open >= 3, "{open}");
        let limit = descriptor_limit().unwrap_or(u64::MAX);
        assert!(limit > open);
    }
}
