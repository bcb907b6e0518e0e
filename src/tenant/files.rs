//! A tenant's files, reached only beneath its `work/` directory handle.
//!
//! Every path from a client is resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` relative to the work dir's descriptor, never by string prefix:
//! `..` is refused outright, and a symlink (absolute, or relative but leading out) makes
//! the kernel answer EXDEV, which is reported as `path_escape`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

/// Refusals and failures of the file API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilesError {
    /// `..`, an absolute path, or a symlink leading out of `work/`.
    #[error("path leaves the tenant's work directory")]
    PathEscape,
    /// Empty, NUL, non-UTF-8 or over-long path.
    #[error("invalid path: {0}")]
    BadPath(&'static str),
    /// Nothing at that path.
    #[error("no such file or directory")]
    NotFound,
    /// A directory where a file was needed (or the reverse).
    #[error("{0}")]
    WrongType(&'static str),
    /// A directory that is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// The file is larger than the configured maximum.
    #[error("file larger than {0} bytes")]
    TooLarge(u64),
    /// `work/` could not be measured whole (too many entries, or a part the daemon cannot
    /// read even after restoring its owner's permissions), so it counts as over quota.
    #[error("work/ cannot be measured: {0}")]
    Unmeasurable(String),
    /// The kernel refused for another reason.
    #[error("{op}: {errno:?}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
}

fn os(op: &'static str) -> impl FnOnce(Errno) -> FilesError {
    move |errno| match errno {
        Errno::EXDEV | Errno::ELOOP => FilesError::PathEscape,
        Errno::ENOENT => FilesError::NotFound,
        Errno::ENOTDIR => FilesError::WrongType("a path component is not a directory"),
        Errno::EISDIR => FilesError::WrongType("is a directory"),
        Errno::ENOTEMPTY => FilesError::NotEmpty,
        Errno::ENAMETOOLONG => FilesError::BadPath("name too long"),
        // Opening a socket (or another special file without an open method) by path.
        Errno::ENXIO | Errno::ENODEV => FilesError::WrongType("not a regular file"),
        errno => FilesError::Os { op, errno },
    }
}

const MAX_PATH: usize = 4096;
/// Entries a listing returns at most (the response says when it stopped there).
pub const MAX_LISTING: usize = 10_000;

/// Checks a client path lexically: relative components only, no `..`, no NUL. An empty
/// path (or `/`) is the work dir itself.
pub fn clean_path(raw: &[u8]) -> Result<PathBuf, FilesError> {
    if raw.len() > MAX_PATH {
        return Err(FilesError::BadPath("longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(FilesError::BadPath("contains NUL"));
    }
    let s = std::str::from_utf8(raw).map_err(|_| FilesError::BadPath("not UTF-8"))?;
    let mut out = PathBuf::new();
    for c in Path::new(s.trim_start_matches('/')).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(FilesError::PathEscape);
            }
        }
    }
    Ok(out)
}

fn beneath(flags: OFlag) -> OpenHow {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    // The kernel rejects a mode without O_CREAT.
    if flags.contains(OFlag::O_CREAT) {
        how.mode(Mode::from_bits_truncate(0o644))
    } else {
        how
    }
}

/// Reads an opened file, refusing more than `max` bytes (it may have grown since).
pub fn read_file(file: std::fs::File, max: u64) -> Result<Vec<u8>, FilesError> {
    let mut buf = Vec::new();
    let mut limited = file.take(max + 1);
    limited
        .read_to_end(&mut buf)
        .map_err(|e| os("read")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    if buf.len() as u64 > max {
        return Err(FilesError::TooLarge(max));
    }
    Ok(buf)
}

/// A handle on one tenant's `work/`.
#[derive(Debug)]
pub struct WorkDir {
    root: OwnedFd,
    owner: Option<(u32, u32)>,
}

/// One directory entry in a listing.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Entry {
    /// File name (lossily converted if not UTF-8).
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
}

/// What a GET found.
#[derive(Debug)]
pub enum Found {
    /// An open regular file and its size when opened (read it with [`read_file`]).
    File(std::fs::File, u64),
    /// A directory listing, sorted by name, and whether it was cut at the cap.
    Dir(Vec<Entry>, bool),
}

impl WorkDir {
    /// Opens the work dir (a daemon-made path; symlinks refused). `owner` is the host
    /// uid/gid new files get when the daemon runs as root.
    pub fn open(path: &Path, owner: Option<(u32, u32)>) -> Result<WorkDir, FilesError> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let root = openat2(nix::fcntl::AT_FDCWD, path, how).map_err(os("open work dir"))?;
        Ok(WorkDir { root, owner })
    }

    fn open_beneath(&self, rel: &Path, flags: OFlag) -> Result<OwnedFd, FilesError> {
        let target: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        openat2(self.root.as_fd(), target, beneath(flags)).map_err(os("openat2"))
    }

    /// Opens a file (refusing one over `max` bytes) or lists a directory.
    pub fn get(&self, rel: &Path, max: u64) -> Result<Found, FilesError> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)?;
        let st = fstat(&fd).map_err(os("fstat"))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            let mut dir = nix::dir::Dir::from_fd(fd).map_err(os("fdopendir"))?;
            let mut names = Vec::new();
            let mut truncated = false;
            for e in dir.iter() {
                let e = e.map_err(os("readdir"))?;
                let name = e.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                if names.len() == MAX_LISTING {
                    truncated = true;
                    break;
                }
                names.push(name.to_vec());
            }
            // Each entry is examined relative to the directory actually opened (never by
            // re-resolving a path), so a concurrent rename cannot point the stat elsewhere.
            let mut entries = Vec::with_capacity(names.len());
            for name in names {
                let meta = nix::sys::stat::fstatat(
                    &dir,
                    OsStr::from_bytes(&name),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                );
                let (kind, size) = match meta {
                    Ok(m) => {
                        let k = SFlag::from_bits_truncate(m.st_mode) & SFlag::S_IFMT;
                        let kind = if k == SFlag::S_IFREG {
                            "file"
                        } else if k == SFlag::S_IFDIR {
                            "dir"
                        } else if k == SFlag::S_IFLNK {
                            "symlink"
                        } else {
                            "other"
                        };
                        (kind, m.st_size as u64)
                    }
                    Err(_) => ("other", 0),
                };
                entries.push(Entry {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    kind,
                    size,
                });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(Found::Dir(entries, truncated));
        }
        if kind != SFlag::S_IFREG {
            return Err(FilesError::WrongType("not a regular file"));
        }
        if st.st_size as u64 > max {
            return Err(FilesError::TooLarge(max));
        }
        Ok(Found::File(std::fs::File::from(fd), st.st_size as u64))
    }

    fn chown(&self, fd: &OwnedFd) -> Result<(), FilesError> {
        if let Some((uid, gid)) = self.owner {
            nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into())).map_err(os("fchown"))?;
        }
        Ok(())
    }

    /// Opens the parent directory of `rel`, creating missing directories beneath the work
    /// dir. Each prefix is re-resolved from the work dir's handle, so a symlink anywhere
    /// on the way still cannot lead out.
    fn parent(&self, rel: &Path) -> Result<(OwnedFd, std::ffi::OsString), FilesError> {
        let name = rel
            .file_name()
            .ok_or(FilesError::BadPath("no file name"))?
            .to_os_string();
        let parent = rel.parent().unwrap_or(Path::new(""));
        let mut prefix = PathBuf::new();
        for comp in parent.components() {
            prefix.push(comp);
            match self.open_beneath(&prefix, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Ok(_) => {}
                Err(FilesError::NotFound) => {
                    let up = self.open_beneath(
                        prefix.parent().unwrap_or(Path::new("")),
                        OFlag::O_PATH | OFlag::O_DIRECTORY,
                    )?;
                    match nix::sys::stat::mkdirat(
                        &up,
                        comp.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(os("mkdirat")(e)),
                    }
                    let made = self.open_beneath(&prefix, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
                    self.chown(&made)?;
                }
                Err(e) => return Err(e),
            }
        }
        let dir = self.open_beneath(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        Ok((dir, name))
    }

    /// The apparent size of everything under the work dir (regular files' lengths), the
    /// figure `disk_bytes` limits. Walks with directory handles and never follows a
    /// symlink. A directory its owner made unreadable gets its owner's `rwx` back (the
    /// daemon is that owner, or root) so nothing can be hidden from the count; more than
    /// `max_entries` entries, or anything still unreadable, is `Unmeasurable`.
    pub fn usage(&self, max_entries: usize) -> Result<u64, FilesError> {
        let unmeasurable = |what: &str, e: Errno| FilesError::Unmeasurable(format!("{what}: {e}"));
        let root = self.open_beneath(Path::new(""), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mut stack = vec![root];
        let (mut total, mut seen) = (0u64, 0usize);
        while let Some(fd) = stack.pop() {
            let mut dir = nix::dir::Dir::from_fd(fd).map_err(os("fdopendir"))?;
            let mut names = Vec::new();
            for e in dir.iter() {
                let e = e.map_err(|e| unmeasurable("readdir", e))?;
                let name = e.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                seen += 1;
                if seen > max_entries {
                    return Err(FilesError::Unmeasurable(format!(
                        "more than {max_entries} entries"
                    )));
                }
                names.push(name.to_owned());
            }
            for name in names {
                let st = match nix::sys::stat::fstatat(
                    &dir,
                    name.as_c_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => st,
                    // Gone since the listing (a sandbox may be deleting): nothing to count.
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(unmeasurable("fstatat", e)),
                };
                let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                if kind == SFlag::S_IFREG {
                    total = total.saturating_add(st.st_size.max(0) as u64);
                } else if kind == SFlag::S_IFDIR {
                    let open = || {
                        nix::fcntl::openat(
                            &dir,
                            name.as_c_str(),
                            OFlag::O_RDONLY
                                | OFlag::O_DIRECTORY
                                | OFlag::O_NOFOLLOW
                                | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                    };
                    let sub = match open() {
                        Err(Errno::EACCES) => {
                            let mode = Mode::from_bits_truncate(st.st_mode) | Mode::S_IRWXU;
                            nix::sys::stat::fchmodat(
                                &dir,
                                name.as_c_str(),
                                mode,
                                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                            )
                            .map_err(|e| unmeasurable("fchmodat", e))?;
                            open()
                        }
                        r => r,
                    };
                    match sub {
                        Ok(sub) => stack.push(sub),
                        Err(Errno::ENOENT) => {}
                        Err(e) => return Err(unmeasurable("openat", e)),
                    }
                }
            }
        }
        Ok(total)
    }

    /// The length of the regular file at `rel`, 0 if there is none (or it is something
    /// else).
    pub fn file_size(&self, rel: &Path) -> u64 {
        let Some(name) = rel.file_name() else {
            return 0;
        };
        match self.open_beneath(
            rel.parent().unwrap_or(Path::new("")),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        ) {
            Ok(dir) => regular_size(&dir, name),
            Err(_) => 0,
        }
    }

    /// Writes a file atomically (temp file, fsync, rename), creating parent directories.
    /// A symlink at the final name is replaced, never followed. Returns the length of the
    /// regular file it replaced (0 if none), for disk accounting.
    pub fn put(&self, rel: &Path, bytes: &[u8]) -> Result<u64, FilesError> {
        if rel.as_os_str().is_empty() {
            return Err(FilesError::WrongType("is a directory"));
        }
        let (dir, name) = self.parent(rel)?;
        let tmp_name = format!(".bulkhead-tmp-{}", crate::auth::trace_id());
        let tmp = openat2(
            dir.as_fd(),
            tmp_name.as_str(),
            beneath(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL),
        )
        .map_err(os("create"))?;
        let result = (|| {
            self.chown(&tmp)?;
            let mut f = std::fs::File::from(tmp);
            f.write_all(bytes)
                .map_err(|e| os("write")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
            f.sync_all()
                .map_err(|e| os("fsync")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
            let replaced = regular_size(&dir, name.as_os_str());
            nix::fcntl::renameat(&dir, tmp_name.as_str(), &dir, name.as_os_str())
                .map_err(os("renameat"))?;
            Ok(replaced)
        })();
        if result.is_err() {
            // Best effort: the temp file has a random name and is not visible under the
            // requested path either way.
            let _removed = nix::unistd::unlinkat(
                &dir,
                tmp_name.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        result
    }

    /// Deletes a file, or an empty directory. Returns the length of the regular file
    /// removed (0 for anything else).
    pub fn delete(&self, rel: &Path) -> Result<u64, FilesError> {
        if rel.as_os_str().is_empty() {
            return Err(FilesError::WrongType("cannot delete the work directory"));
        }
        let name = rel.file_name().ok_or(FilesError::BadPath("no file name"))?;
        let dir = self.open_beneath(
            rel.parent().unwrap_or(Path::new("")),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        )?;
        let st = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(os("fstatat"))?;
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        let flag = if is_dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(&dir, name, flag).map_err(os("unlinkat"))?;
        Ok(
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG {
                st.st_size.max(0) as u64
            } else {
                0
            },
        )
    }
}

/// The length of the regular file `name` in `dir`, 0 if there is none.
fn regular_size(dir: &OwnedFd, name: &OsStr) -> u64 {
    match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => {
            st.st_size.max(0) as u64
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_checks() {
        assert_eq!(clean_path(b"a/b/./c").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(clean_path(b"/a").unwrap(), PathBuf::from("a"));
        assert_eq!(clean_path(b"").unwrap(), PathBuf::new());
        assert_eq!(clean_path(b"a/../b"), Err(FilesError::PathEscape));
        assert_eq!(clean_path(b".."), Err(FilesError::PathEscape));
        assert_eq!(
            clean_path(b"a\0b"),
            Err(FilesError::BadPath("contains NUL"))
        );
        assert_eq!(
            clean_path(&[0x66, 0xff]),
            Err(FilesError::BadPath("not UTF-8"))
        );
    }

    fn tmp_work() -> (PathBuf, WorkDir) {
        let dir = std::env::temp_dir().join(format!("bulkhead-files-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::write(dir.join("outside.txt"), "outside").unwrap();
        let w = WorkDir::open(&dir.join("work"), None).unwrap();
        (dir, w)
    }

    #[test]
    fn put_get_list_delete() {
        let (dir, w) = tmp_work();
        w.put(Path::new("a/b/c.txt"), b"hello").unwrap();
        match w.get(Path::new("a/b/c.txt"), 100).unwrap() {
            Found::File(f, 5) => assert_eq!(read_file(f, 100).unwrap(), b"hello"),
            other => panic!("{other:?}"),
        }
        match w.get(Path::new("a"), 100).unwrap() {
            Found::Dir(e, truncated) => {
                assert!(!truncated);
                assert_eq!(
                    e,
                    vec![Entry {
                        name: "b".into(),
                        kind: "dir",
                        size: e[0].size
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            w.get(Path::new("a/b/c.txt"), 3).unwrap_err(),
            FilesError::TooLarge(3)
        );
        assert_eq!(w.delete(Path::new("a")).unwrap_err(), FilesError::NotEmpty);
        w.delete(Path::new("a/b/c.txt")).unwrap();
        assert_eq!(
            w.get(Path::new("a/b/c.txt"), 100).unwrap_err(),
            FilesError::NotFound
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn symlinks_leading_out_are_escapes() {
        let (dir, w) = tmp_work();
        std::os::unix::fs::symlink(dir.join("outside.txt"), dir.join("work/abs")).unwrap();
        std::os::unix::fs::symlink("../outside.txt", dir.join("work/rel")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("work/up")).unwrap();
        std::fs::write(dir.join("work/inside.txt"), "in").unwrap();
        std::os::unix::fs::symlink("inside.txt", dir.join("work/ok")).unwrap();
        for p in ["abs", "rel", "up/outside.txt", "up"] {
            assert_eq!(
                w.get(Path::new(p), 100).unwrap_err(),
                FilesError::PathEscape,
                "{p}"
            );
        }
        assert_eq!(
            w.put(Path::new("up/new.txt"), b"x").unwrap_err(),
            FilesError::PathEscape
        );
        assert!(!dir.join("new.txt").exists());
        // A symlink inside that stays inside is followed for reads...
        match w.get(Path::new("ok"), 100).unwrap() {
            Found::File(f, _) => assert_eq!(read_file(f, 100).unwrap(), b"in"),
            other => panic!("{other:?}"),
        }
        // ...and replaced, not followed, by writes.
        w.put(Path::new("abs"), b"replaced").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("outside.txt")).unwrap(),
            "outside"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
