//! The library's error type: every failure names what it was doing and to which path.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is not a Latus folder (it has no .latus/ directory; `latus scan` creates one)", .0.display())]
    NotAFolder(PathBuf),
    #[error("{} is busy: another latus process is working on this folder", .0.display())]
    FolderBusy(PathBuf),
    #[error("the database {} is locked by another process", .0.display())]
    DatabaseLocked(PathBuf),
    #[error("no space left to write the database {}; what was committed before is kept, free some space and scan again", .0.display())]
    DiskFull(PathBuf),
    #[error("the database {} is corrupt ({reason}); move it aside and rescan", path.display())]
    CorruptDatabase { path: PathBuf, reason: String },
    #[error("the history database {} has schema version {found}, newer than this Latus knows ({known}); upgrade Latus", path.display())]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database {}: {source}", path.display())]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("device state in {}: {reason}", path.display())]
    DeviceState { path: PathBuf, reason: String },
    #[error("no home directory found: pass --home DIR or set LATUS_HOME")]
    NoHome,
    #[error("config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("invalid peer id {0:?}: {1}")]
    InvalidPeerId(String, &'static str),
    #[error("the scan was interrupted: {0}")]
    ScanAborted(String),
    #[error("refused path {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("{} has no .latus/ directory but was synced before: is the drive mounted? (to start it over as a new folder, run `latus scan` on it first)", .0.display())]
    MissingMarker(PathBuf),
    #[error("this sync would delete {deletes} of the {files} files in {} (more than {percent}%); nothing was changed. If that is intended, run again with --allow-mass-delete", root.display())]
    MassDelete {
        root: PathBuf,
        deletes: usize,
        files: usize,
        percent: u32,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("peer: {0}")]
    Peer(String),
    #[error("xmpp: {0}")]
    Xmpp(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("trash of {}: no trashed version of {path:?}", root.display())]
    NotInTrash { root: PathBuf, path: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
