//! A synced folder: its root and the `.latus/` directory inside it.
//!
//! `.latus/` marks a root as a Latus folder. A root whose marker is gone (an
//! unmounted drive shows an empty mount point) is refused rather than read as
//! "everything was deleted".

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The marker directory; never scanned, at any depth.
pub const MARKER_DIR: &str = ".latus";
pub const HISTORY_DB: &str = "history.db";
/// Ignore rules in gitignore syntax, honoured in every directory.
pub const IGNORE_FILE: &str = ".latusignore";
const LOCK_FILE: &str = "lock";
/// Name prefix of the temp files the merger builds beside their final path. Never
/// synced; a walk made under the folder lock removes them (a killed run's leftovers).
pub const TEMP_PREFIX: &str = ".latus-tmp-";

#[derive(Debug, Clone)]
pub struct Folder {
    root: PathBuf,
}

/// Held while a process writes to a folder; released on drop (or when the process dies).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

impl Folder {
    /// An existing Latus folder.
    pub fn open(root: &Path) -> Result<Self> {
        let root = checked_root(root)?;
        let marker = root.join(MARKER_DIR);
        if !marker.is_dir() {
            return Err(Error::NotAFolder(root));
        }
        Ok(Folder { root })
    }

    /// A Latus folder, created (`.latus/`) if the root is not one yet.
    pub fn open_or_create(root: &Path) -> Result<Self> {
        let root = checked_root(root)?;
        let marker = root.join(MARKER_DIR);
        fs::create_dir_all(&marker).map_err(|e| Error::io(&marker, e))?;
        Ok(Folder { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn marker_dir(&self) -> PathBuf {
        self.root.join(MARKER_DIR)
    }

    pub fn history_path(&self) -> PathBuf {
        self.marker_dir().join(HISTORY_DB)
    }

    /// The exclusive right to write this folder's state; fails at once when another
    /// process holds it.
    pub fn lock(&self) -> Result<FolderLock> {
        let path = self.marker_dir().join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(FolderLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(Error::FolderBusy(self.root.clone())),
            Err(TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

/// Checks a relative folder path received from anywhere (a peer, a user): `/`
/// separated, no empty, `.` or `..` component, no NUL, not inside `.latus/`.
pub fn check_relative(path: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::UnsafePath {
            path: path.to_string(),
            reason,
        })
    };
    if path.is_empty() {
        return refuse("empty");
    }
    if path.starts_with('/') {
        return refuse("absolute");
    }
    if path.contains('\0') {
        return refuse("contains NUL");
    }
    for component in path.split('/') {
        match component {
            "" => return refuse("empty component"),
            "." | ".." => return refuse("`.` or `..` component"),
            MARKER_DIR => return refuse("inside .latus/"),
            _ => {}
        }
    }
    Ok(())
}

fn checked_root(root: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(root.to_path_buf()),
        _ => Error::io(root, e),
    })?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(root.to_path_buf()));
    }
    root.canonicalize().map_err(|e| Error::io(root, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_that_could_escape_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../../x",
            "..",
            "a//b",
            "./a",
            "a/",
            ".latus/history.db",
            "x/.latus/y",
            "nul\0byte",
        ] {
            assert!(
                matches!(check_relative(bad), Err(Error::UnsafePath { .. })),
                "{bad:?}"
            );
        }
        for good in ["a", "a/b.txt", "..hidden", "a/.latusignore", "...", "é/ü"] {
            check_relative(good).unwrap();
        }
    }

    #[test]
    fn open_refuses_a_root_without_marker() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Folder::open(dir.path()),
            Err(Error::NotAFolder(_))
        ));
        Folder::open_or_create(dir.path()).unwrap();
        Folder::open(dir.path()).unwrap();
    }

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open_or_create(dir.path()).unwrap();
        let held = folder.lock().unwrap();
        assert!(matches!(folder.lock(), Err(Error::FolderBusy(_))));
        drop(held);
        folder.lock().unwrap();
    }

    #[test]
    fn files_and_missing_paths_are_not_roots() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Folder::open_or_create(&file),
            Err(Error::NotADirectory(_))
        ));
        assert!(matches!(
            Folder::open_or_create(&dir.path().join("nope")),
            Err(Error::NotFound(_))
        ));
    }
}
