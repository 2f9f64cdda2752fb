//! "A peer" as the reconciliation engine sees it: a history it can read from a
//! sequence number on, and chunks it can serve by hash. `latus sync` talks to an
//! in-process [`FolderPeer`] backed by another folder on this machine; the network
//! peer implements the same trait.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::content::{ChunkInfo, Hash};
use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::folder::Folder;
use crate::history::{Entry, HistoryStore, Kind};

pub trait Peer {
    /// The peer's replica id: the author id of the versions it records.
    fn id(&self) -> PeerId;
    /// Its history entries after `seq`, oldest first, at most `limit`.
    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>>;
    /// The chunk list of a content it announced (empty for an empty content).
    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>>;
    /// The bytes of `chunk`, which it announced as part of `content`; `None` when
    /// it no longer holds them (the file changed since it was hashed).
    fn read_chunk(&self, content: &Hash, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>>;
}

/// Another folder on this machine, read through its own history.
pub struct FolderPeer {
    root: PathBuf,
    id: PeerId,
    store: HistoryStore,
}

impl FolderPeer {
    pub fn open(folder: &Folder) -> Result<Self> {
        let store = HistoryStore::open_read_only(&folder.history_path())?;
        Ok(FolderPeer {
            root: folder.root().to_path_buf(),
            id: store.replica_id()?,
            store,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Peer for FolderPeer {
    fn id(&self) -> PeerId {
        self.id
    }

    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>> {
        self.store.changes_since(seq, limit)
    }

    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        self.store.chunks_of(content)
    }

    fn read_chunk(&self, content: &Hash, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        // Any current file with that content will do; then any file holding the chunk.
        let by_content = self
            .store
            .latests_by_hash(content)?
            .into_iter()
            .map(|e| (e, chunk.offset));
        for (entry, offset) in by_content {
            if let Some(bytes) = read_verified(&self.root, &entry, offset, chunk)? {
                return Ok(Some(bytes));
            }
        }
        for (entry, offset) in self.store.chunk_locations(&chunk.hash)? {
            if let Some(bytes) = read_verified(&self.root, &entry, offset, chunk)? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }
}

/// Reads `chunk` at `offset` of the file `entry` describes, if the file still is
/// what was hashed and the bytes have the chunk's hash.
pub(crate) fn read_verified(
    root: &Path,
    entry: &Entry,
    offset: u64,
    chunk: &ChunkInfo,
) -> Result<Option<Vec<u8>>> {
    if entry.kind != Kind::File {
        return Ok(None);
    }
    let path = root.join(&entry.path);
    let file = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    if !meta.is_file() || meta.size() != entry.size || mtime_ns != entry.mtime_ns {
        return Ok(None);
    }
    let mut bytes = vec![0; chunk.len as usize];
    match file.read_exact_at(&mut bytes, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    }
    Ok((Hash::of(&bytes) == chunk.hash).then_some(bytes))
}

/// The path is not there (or a parent is not a directory, or it is a symlink
/// opened with O_NOFOLLOW).
pub(crate) fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}
