//! Cache archives: workspace paths to a zstd-compressed tar stream and back. Packing reads
//! without following links; unpacking writes only beneath the workspace: entries with `..`,
//! absolute paths, hard links, links pointing out, or paths through a link are refused, and
//! every file, directory and link made is given to the job's user.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::select::{kind_at, open_dir_beneath, open_file_beneath, open_root, split_parent};
use super::spec::normalize;

/// Most entries one archive may have.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// zstd's level: fast, and much smaller than the files.
const LEVEL: i32 = 3;

/// Who restored files belong to.
#[derive(Debug, Clone, Copy)]
pub enum Owner {
    /// The agent is root: files are chowned to the job's `uid:gid`.
    Chown(u32, u32),
    /// The agent cannot chown: files are opened to everyone, as the workspace is.
    OpenUp,
}

fn too_large(limit: u64) -> io::Error {
    io::Error::other(format!(
        "the cache holds more than store.max_cache_bytes ({limit} bytes)"
    ))
}

/// Writes an archive of `paths` (literal, workspace-relative) to `out`; returns the bytes of
/// file contents packed. Paths that do not exist are left out.
pub fn pack(root: &Path, paths: &[String], out: impl Write, limit: u64) -> io::Result<u64> {
    let root_fd = open_root(root)?;
    let mut tar = tar::Builder::new(zstd::Encoder::new(out, LEVEL)?);
    let mut total = 0u64;
    for path in paths {
        let rel = normalize(path);
        if kind_at(&root_fd, &rel)?.is_none() {
            continue;
        }
        pack_entry(&root_fd, &rel, &mut tar, &mut total, limit)?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(total)
}

fn pack_entry<W: Write>(
    root: &OwnedFd,
    rel: &str,
    tar: &mut tar::Builder<W>,
    total: &mut u64,
    limit: u64,
) -> io::Result<()> {
    let (parent, name) = split_parent(rel);
    let dir = open_dir_beneath(root, parent)?;
    let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    let mut header = tar::Header::new_gnu();
    header.set_mode(stat.st_mode & 0o777);
    header.set_mtime(stat.st_mtime.max(0) as u64);
    if kind.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        tar.append_data(&mut header, format!("{rel}/"), io::empty())?;
        let sub = open_dir_beneath(root, rel)?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&sub)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"."
                && name != b".."
                && let Ok(name) = std::str::from_utf8(name)
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        for name in names {
            pack_entry(root, &format!("{rel}/{name}"), tar, total, limit)?;
        }
    } else if kind.is_file() {
        let file = open_file_beneath(root, rel)?;
        let size = file.metadata()?.len();
        *total += size;
        if *total > limit {
            return Err(too_large(limit));
        }
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        tar.append_data(
            &mut header,
            rel,
            Exact {
                inner: file,
                left: size,
            },
        )?;
    } else if kind == rustix::fs::FileType::Symlink {
        let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
        let target = target.to_string_lossy().into_owned();
        // A link pointing out would be refused when restored: leave it out now.
        if link_stays_inside(rel, &target) {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, rel, &target)?;
        }
    }
    Ok(())
}

/// Reads exactly `left` bytes (a file that shrank while packed fails instead of corrupting the
/// archive; one that grew is cut at its size when it was looked at).
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other("a file shrank while it was archived"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// True when a link at `rel` pointing at `target` resolves (lexically) inside the workspace.
pub fn link_stays_inside(rel: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let (parent, _) = split_parent(rel);
    let mut depth: Vec<&str> = parent.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            other => depth.push(other),
        }
    }
    true
}

/// An archive entry's path as a plain workspace-relative path, or why it is refused.
fn entry_path(path: &Path) -> io::Result<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| io::Error::other("an entry's path is not UTF-8"))?,
            ),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::other(format!(
                    "entry `{}` leaves the workspace",
                    path.display()
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(io::Error::other("an entry names the workspace itself"));
    }
    Ok(parts.join("/"))
}

/// Unpacks an archive from `input` beneath `root`; returns the bytes of file contents.
pub fn unpack(root: &Path, input: impl Read, limit: u64, owner: Owner) -> io::Result<u64> {
    let root_fd = open_root(root)?;
    let mut archive = tar::Archive::new(zstd::Decoder::new(input)?);
    let mut total = 0u64;
    let mut count = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(io::Error::other(format!("more than {MAX_ENTRIES} entries")));
        }
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let rel = entry_path(&entry.path()?)?;
        let mode = entry.header().mode()? & 0o777;
        match kind {
            tar::EntryType::Directory => {
                let dir = make_dirs(&root_fd, &rel, owner)?;
                set_mode(&dir, mode | 0o700, owner)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total += entry.header().size()?;
                if total > limit {
                    return Err(too_large(limit));
                }
                let (parent, name) = split_parent(&rel);
                let dir = make_dirs(&root_fd, parent, owner)?;
                clear(&dir, name)?;
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                let mut file = std::fs::File::from(fd);
                io::copy(&mut entry, &mut file)?;
                let mtime = entry.header().mtime().unwrap_or(0);
                // A header's time comes from the archive: an overflowing one is not applied.
                if let Some(at) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(mtime)) {
                    file.set_modified(at)?;
                }
                set_mode(&file, mode | 0o600, owner)?;
                if let Owner::Chown(uid, gid) = owner {
                    rustix::fs::fchown(&file, Some(uid_of(uid)), Some(gid_of(gid)))?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| io::Error::other("a link without a target"))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| io::Error::other("a link target is not UTF-8"))?
                    .to_owned();
                if !link_stays_inside(&rel, &target) {
                    return Err(io::Error::other(format!(
                        "link `{rel}` points outside the workspace"
                    )));
                }
                let (parent, name) = split_parent(&rel);
                let dir = make_dirs(&root_fd, parent, owner)?;
                clear(&dir, name)?;
                rustix::fs::symlinkat(target.as_str(), &dir, name)?;
                if let Owner::Chown(uid, gid) = owner {
                    rustix::fs::chownat(
                        &dir,
                        name,
                        Some(uid_of(uid)),
                        Some(gid_of(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )?;
                }
            }
            tar::EntryType::Link => {
                return Err(io::Error::other(format!(
                    "entry `{rel}` is a hard link: refused"
                )));
            }
            // Devices, FIFOs and the like are never packed: ignore them.
            _ => {}
        }
    }
    Ok(total)
}

fn uid_of(uid: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid)
}

fn gid_of(gid: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid)
}

/// Removes what is at `name` in `dir` unless it is a directory (a file, or a link, which is
/// replaced rather than written through).
fn clear(dir: &OwnedFd, name: &str) -> io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir() => Err(
            io::Error::other(format!("`{name}` is a directory in the workspace")),
        ),
        Ok(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `rel` beneath the root, making missing components (owned by the job's
/// user); an existing component that is a link or a file is refused.
fn make_dirs(root: &OwnedFd, rel: &str, owner: Owner) -> io::Result<OwnedFd> {
    let mut current = rustix::io::dup(root)?;
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let next = match rustix::fs::openat(&current, part, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&current, part, Mode::from_raw_mode(0o755))?;
                let fd = rustix::fs::openat(&current, part, flags, Mode::empty())?;
                set_mode(&fd, 0o755, owner)?;
                if let Owner::Chown(uid, gid) = owner {
                    rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(gid)))?;
                }
                fd
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "`{part}` on the way to `{rel}` is not a plain directory: {e}"
                )));
            }
        };
        current = next;
    }
    Ok(current)
}

fn set_mode(fd: impl std::os::fd::AsFd, mode: u32, owner: Owner) -> io::Result<()> {
    let mode = match owner {
        Owner::Chown(..) => mode,
        // Not root: the job's user is someone else and must be able to change what it gets.
        Owner::OpenUp => {
            mode | if mode & 0o100 != 0 || mode & 0o40000 != 0 {
                0o777
            } else {
                0o666
            }
        }
    };
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_only() {
        assert!(link_stays_inside("a/b", "c"));
        assert!(link_stays_inside("a/b", "../c"));
        assert!(!link_stays_inside("a/b", "../../c"));
        assert!(!link_stays_inside("a", "/etc"));
        assert!(!link_stays_inside("a", ""));
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        build(&mut tar);
        zstd::encode_all(&tar.into_inner().unwrap()[..], 1).unwrap()
    }

    fn raw_entry(tar: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, link: &str) {
        let mut h = tar::Header::new_old();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        // Written raw: the tar crate's setters refuse `..` themselves.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        tar.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn round_trip_and_hostile_entries_refused() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("t/deep")).unwrap();
        std::fs::write(src.path().join("t/deep/f"), "hello").unwrap();
        std::os::unix::fs::symlink("deep/f", src.path().join("t/in")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("t/out")).unwrap();
        let mut packed = Vec::new();
        let bytes = pack(
            src.path(),
            &["t".into(), "missing".into()],
            &mut packed,
            1000,
        )
        .unwrap();
        assert_eq!(bytes, 5);
        let dst = tempfile::tempdir().unwrap();
        unpack(dst.path(), &packed[..], 1000, Owner::OpenUp).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.path().join("t/deep/f")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("t/in")).unwrap(),
            Path::new("deep/f")
        );
        assert!(
            std::fs::symlink_metadata(dst.path().join("t/out")).is_err(),
            "link out left out"
        );
        assert!(
            pack(src.path(), &["t".into()], Vec::new(), 4).is_err(),
            "limit"
        );
        assert!(
            unpack(dst.path(), &packed[..], 4, Owner::OpenUp).is_err(),
            "limit"
        );

        let outside = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                archive(|t| raw_entry(t, tar::EntryType::Regular, "../escape", "")),
            ),
            (
                "absolute",
                archive(|t| raw_entry(t, tar::EntryType::Regular, "/tmp/escape", "")),
            ),
            (
                "link out",
                archive(|t| raw_entry(t, tar::EntryType::Symlink, "l", "/etc")),
            ),
            (
                "link up",
                archive(|t| raw_entry(t, tar::EntryType::Symlink, "l", "../..")),
            ),
            (
                "hard link",
                archive(|t| raw_entry(t, tar::EntryType::Link, "h", "/etc/passwd")),
            ),
        ];
        for (what, data) in cases {
            let dst = tempfile::tempdir().unwrap();
            assert!(
                unpack(dst.path(), &data[..], 1000, Owner::OpenUp).is_err(),
                "{what}"
            );
        }
        // A link already in the workspace is never written through.
        let dst = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("t")).unwrap();
        assert!(unpack(dst.path(), &packed[..], 1000, Owner::OpenUp).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
