//! Resource guards: the free disk space below which the agent takes no new job.
//!
//! A full disk fails jobs in confusing ways (a clone that stops halfway, a build that cannot
//! write); it is better not to take them and to say why on `/health`.

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
}
