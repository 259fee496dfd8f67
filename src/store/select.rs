//! Files in a workspace, found and opened without ever following a symbolic link: the job
//! controls the workspace, and the agent (often root) must not read or write outside it.
//!
//! Walking uses `lstat`-style metadata only; opening goes component by component with
//! `openat(O_NOFOLLOW)` from the workspace's own descriptor, so a link swapped in between the
//! walk and the open makes the open fail instead of escaping.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::spec::{glob, is_glob, normalize};

/// Most files one selection may hold, and most directory entries it may look at.
pub const MAX_FILES: usize = 10_000;
pub const MAX_VISITED: usize = 1_000_000;

/// Files matched by a list of patterns: workspace-relative paths with their sizes (sorted,
/// no duplicates), and what the log should say about patterns that matched nothing or links.
#[derive(Debug, Default)]
pub struct Selection {
    pub files: Vec<(String, u64)>,
    pub warnings: Vec<String>,
}

/// Opens the workspace directory itself.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `rel` beneath `dir` without following links; `""` is `dir` itself.
pub fn open_dir_beneath(dir: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    let mut current = rustix::io::dup(dir)?;
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(io::Error::other("`..` in a path"));
        }
        current = rustix::fs::openat(
            &current,
            part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(current)
}

/// Splits `a/b/c` into (`a/b`, `c`).
pub fn split_parent(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

/// Opens the regular file `rel` beneath the workspace for reading, without following links
/// (and without blocking on a FIFO swapped in).
pub fn open_file_beneath(root: &OwnedFd, rel: &str) -> io::Result<File> {
    let (parent, name) = split_parent(rel);
    let dir = open_dir_beneath(root, parent)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// What is at `rel` (not following a link there), or `None` when nothing is or a component
/// on the way is not a plain directory.
pub fn kind_at(root: &OwnedFd, rel: &str) -> io::Result<Option<rustix::fs::FileType>> {
    let (parent, name) = split_parent(rel);
    let dir = match open_dir_beneath(root, parent) {
        Ok(dir) => dir,
        Err(_) => return Ok(None),
    };
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(rustix::fs::FileType::from_raw_mode(stat.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Selects the files `patterns` name: a file; a directory (everything beneath it); or a glob
/// (`*` within a component, `**` across). Links are never followed nor selected.
pub fn select(root: &Path, patterns: &[String]) -> io::Result<Selection> {
    let root_fd = open_root(root)?;
    let mut out = Selection::default();
    let mut visited = 0usize;
    for pattern in patterns {
        let before = out.files.len();
        let norm = normalize(pattern);
        if is_glob(&norm) {
            let matcher = glob(&norm).map_err(io::Error::other)?;
            let base: Vec<&str> = norm.split('/').take_while(|p| !is_glob(p)).collect();
            let base = base.join("/");
            if base.is_empty() || kind_at(&root_fd, &base)?.is_some_and(|k| k.is_dir()) {
                walk(&root_fd, &base, &mut visited, &mut |rel, kind, size| {
                    if matcher.is_match(rel) {
                        take(&mut out, pattern, rel, kind, size);
                    }
                })?;
            }
        } else {
            match kind_at(&root_fd, &norm)? {
                Some(k) if k.is_dir() => {
                    walk(&root_fd, &norm, &mut visited, &mut |rel, kind, size| {
                        take(&mut out, pattern, rel, kind, size)
                    })?
                }
                Some(rustix::fs::FileType::Symlink) => out.warnings.push(format!(
                    "`{pattern}` is a symbolic link: not followed, not uploaded"
                )),
                Some(k) if k.is_file() => {
                    let file = open_file_beneath(&root_fd, &norm)?;
                    let size = file.metadata()?.len();
                    take(&mut out, pattern, &norm, k, size);
                }
                _ => {}
            }
        }
        if out.files.len() == before {
            out.warnings
                .push(format!("`{pattern}` matches no file in the workspace"));
        }
        if out.files.len() > MAX_FILES {
            return Err(io::Error::other(format!(
                "more than {MAX_FILES} files match"
            )));
        }
    }
    out.files.sort();
    out.files.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn take(out: &mut Selection, pattern: &str, rel: &str, kind: rustix::fs::FileType, size: u64) {
    if kind.is_file() {
        out.files.push((rel.to_owned(), size));
    } else if kind == rustix::fs::FileType::Symlink {
        out.warnings.push(format!(
            "`{rel}` (from `{pattern}`) is a symbolic link: not followed, not uploaded"
        ));
    }
}

/// Calls `visit(rel, kind, size)` for every entry beneath the directory `base` (not the
/// directories themselves), never descending into links.
fn walk(
    root: &OwnedFd,
    base: &str,
    visited: &mut usize,
    visit: &mut dyn FnMut(&str, rustix::fs::FileType, u64),
) -> io::Result<()> {
    let dir = open_dir_beneath(root, base)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        names.push(name.to_owned());
    }
    names.sort();
    for name in names {
        *visited += 1;
        if *visited > MAX_VISITED {
            return Err(io::Error::other(format!(
                "more than {MAX_VISITED} entries to look at"
            )));
        }
        let rel = if base.is_empty() {
            name.clone()
        } else {
            format!("{base}/{name}")
        };
        let stat = match rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        if kind.is_dir() {
            walk(root, &rel, visited, visit)?;
        } else {
            visit(&rel, kind, stat.st_size as u64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sel: &Selection) -> Vec<&str> {
        sel.files.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn selects_files_dirs_and_globs_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::fs::create_dir_all(root.join("dist/sub")).unwrap();
        std::fs::create_dir_all(root.join("reports")).unwrap();
        std::fs::write(root.join("dist/a.bin"), "aa").unwrap();
        std::fs::write(root.join("dist/sub/b.bin"), "b").unwrap();
        std::fs::write(root.join("reports/x.xml"), "x").unwrap();
        std::fs::write(root.join("reports/y.txt"), "y").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("dist/out")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        let patterns: Vec<String> = ["dist/", "reports/*.xml", "missing/*", "out", "out/secret"]
            .map(String::from)
            .into();
        let sel = select(root, &patterns).unwrap();
        assert_eq!(
            names(&sel),
            ["dist/a.bin", "dist/sub/b.bin", "reports/x.xml"]
        );
        assert_eq!(sel.files[0].1, 2);
        let warnings = sel.warnings.join("\n");
        assert!(
            warnings.contains("`dist/out` (from `dist/`) is a symbolic link"),
            "{warnings}"
        );
        assert!(
            warnings.contains("`missing/*` matches no file"),
            "{warnings}"
        );
        assert!(warnings.contains("`out` is a symbolic link"), "{warnings}");
        assert!(
            warnings.contains("`out/secret` matches no file"),
            "{warnings}"
        );
        assert!(open_file_beneath(&open_root(root).unwrap(), "out/secret").is_err());
        let all = select(root, &["**/*.bin".to_owned()]).unwrap();
        assert_eq!(names(&all), ["dist/a.bin", "dist/sub/b.bin"]);
    }
}
