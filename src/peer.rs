//! "A peer" as the reconciliation engine sees it: a history it can read from a
//! sequence number on, and chunks it can serve by hash. `latus sync` talks to an
//! in-process [`FolderPeer`] backed by another folder on this machine; the network
//! peer implements the same trait.

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::content::{ChunkInfo, Hash};
use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::folder::{Folder, check_relative};
use crate::history::{Entry, HistoryStore, Kind};
use crate::merge::copy_range;
use crate::scan::Stat;

/// The answers to [`Peer::ask_for_chunks`], in the order asked, when called.
pub type AskedChunks<'p> = Box<dyn FnOnce() -> Result<Vec<Option<Vec<u8>>>> + 'p>;

/// `Sync`: the merger builds several files at once, each asking for chunks.
pub trait Peer: Sync {
    /// The peer's replica id: the author id of the versions it records.
    fn id(&self) -> PeerId;
    /// Its history entries after `seq`, oldest first, at most `limit`.
    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>>;
    /// The chunk list of a content it announced (empty for an empty content).
    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>>;
    /// The bytes of `chunk`, which it announced as part of `content` at `path`
    /// (where to look first); `None` when it no longer holds them (the file
    /// changed since it was hashed). Bytes returned have the chunk's hash: each
    /// implementation checks what it read or received (the merger relies on it).
    fn read_chunk(&self, path: &str, content: &Hash, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>>;
    /// Several chunks of `content`, each as [`Peer::read_chunk`] would answer,
    /// once the returned call is made. A network peer asks for all of them
    /// now, so that a build writes the chunks it has while these are on their way.
    fn ask_for_chunks<'p>(
        &'p self,
        path: &str,
        content: &Hash,
        chunks: &[ChunkInfo],
    ) -> AskedChunks<'p> {
        let answers = chunks
            .iter()
            .map(|chunk| self.read_chunk(path, content, chunk))
            .collect();
        Box::new(move || answers)
    }

    /// Chunks the merger will soon ask for with [`Peer::read_chunk`], each with
    /// the path and content it was announced as part of. A network peer asks
    /// for them together, and answers those calls from what comes back.
    /// Returns how many of the first of `wanted` it asked for (or had already).
    fn prefetch(&self, _wanted: &[(&str, Hash, ChunkInfo)]) -> usize {
        0
    }
    /// `chunk` was asked for ahead and not read yet: its bytes are here or
    /// on their way.
    fn asked_ahead(&self, _chunk: &Hash) -> bool {
        false
    }
    /// Copies `bytes` of `content`, which it announced at `path`, into `output`
    /// at the same offsets, file to file and unread, when it can vouch for them
    /// without hashing them: a peer on this machine whose file is still as it
    /// was hashed. `false` when it cannot (a network peer, a changed file); the
    /// caller then reads those chunks, and overwrites whatever was copied.
    fn copy_unread(
        &self,
        _path: &str,
        _content: &Hash,
        _bytes: Range<u64>,
        _output: &File,
        _output_path: &Path,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// Contents whose current holders [`FolderPeer`] remembers: a file of many chunks
/// asks for the same content once per chunk.
const HOLDER_CACHE: usize = 256;

/// Another folder on this machine, read through its own history.
pub struct FolderPeer {
    root: PathBuf,
    id: PeerId,
    store: Mutex<HistoryStore>,
    /// Current files holding a content, by content.
    holders: Mutex<HashMap<Hash, Vec<Entry>>>,
}

impl FolderPeer {
    pub fn open(folder: &Folder) -> Result<Self> {
        let store = HistoryStore::open_read_only(&folder.history_path())?;
        Ok(FolderPeer {
            root: folder.root().to_path_buf(),
            id: store.replica_id()?,
            store: Mutex::new(store),
            holders: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store(&self) -> MutexGuard<'_, HistoryStore> {
        // A panic while holding the lock leaves no half-made state: the store
        // only reads.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `chunk` read at its offset in the file at `path`, if the bytes there are it.
    fn read_at(&self, path: &str, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        if check_relative(path).is_err() {
            return Ok(None);
        }
        let abs = self.root.join(path);
        let file = match open_source(&abs) {
            Ok(file) => file,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(Error::io(&abs, e)),
        };
        match read_exact_at_unzeroed(&file, chunk.offset, chunk.len as usize) {
            Ok(Some(bytes)) => Ok((Hash::of(&bytes) == chunk.hash).then_some(bytes)),
            // A directory, a FIFO or a shorter file: not here.
            Ok(None) | Err(_) => Ok(None),
        }
    }

    fn holders_of(&self, content: &Hash) -> Result<Vec<Entry>> {
        let mut cache = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(content) {
            return Ok(found.clone());
        }
        let found = self.store().latests_by_hash(content)?;
        if cache.len() >= HOLDER_CACHE {
            cache.clear();
        }
        cache.insert(*content, found.clone());
        Ok(found)
    }
}

impl Peer for FolderPeer {
    fn id(&self) -> PeerId {
        self.id
    }

    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>> {
        self.store().changes_since(seq, limit)
    }

    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        self.store().chunks_of(content)
    }

    fn read_chunk(&self, path: &str, content: &Hash, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        // Bytes that have the chunk's hash are the chunk, wherever they were read:
        // the file at `path` first, without asking the history where it is.
        if let Some(bytes) = self.read_at(path, chunk)? {
            return Ok(Some(bytes));
        }
        self.read_from_history(path, content, chunk, ReadCheck::Hash)
    }

    fn copy_unread(
        &self,
        path: &str,
        content: &Hash,
        bytes: Range<u64>,
        output: &File,
        output_path: &Path,
    ) -> Result<bool> {
        let holders = self.holders_of(content)?;
        match holders.iter().find(|entry| entry.path == path) {
            Some(entry) => copy_if_unchanged(&self.root, entry, bytes, output, output_path),
            None => Ok(false),
        }
    }
}

impl FolderPeer {
    /// Chunks of `content` for a network peer, which checks every chunk it
    /// receives against its hash. A content of several chunks is read from one
    /// opening of the file at `path`, between two stats: while the file is as
    /// it was when hashed, its chunks go out without being hashed again (see
    /// `ReadCheck::StatOrHash`). `None` for each chunk no file holds any more.
    pub fn serve_chunks(
        &self,
        path: &str,
        content: &Hash,
        chunks: &[ChunkInfo],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        // A content of one chunk (at most 256 KiB) costs less to hash than to
        // look up in the history, once per file.
        if chunks.iter().all(|chunk| chunk.hash == *content) {
            return chunks
                .iter()
                .map(|chunk| self.read_chunk(path, content, chunk))
                .collect();
        }
        let holders = self.holders_of(content)?;
        let mut served = match holders.iter().find(|entry| entry.path == path) {
            Some(at_path) => {
                let wanted: Vec<_> = chunks.iter().map(|chunk| (chunk.offset, chunk)).collect();
                read_checked(&self.root, at_path, &wanted, ReadCheck::StatOrHash)?
            }
            None => vec![None; chunks.len()],
        };
        for (bytes, chunk) in served.iter_mut().zip(chunks) {
            if bytes.is_none() {
                *bytes = self.read_from_history(path, content, chunk, ReadCheck::StatOrHash)?;
            }
        }
        Ok(served)
    }

    /// `chunk` from another current file with `content` than the one at `path`
    /// (which the callers read first), else from any file the history says
    /// holds it.
    fn read_from_history(
        &self,
        path: &str,
        content: &Hash,
        chunk: &ChunkInfo,
        check: ReadCheck,
    ) -> Result<Option<Vec<u8>>> {
        let holders = self.holders_of(content)?;
        for entry in holders.iter().filter(|entry| entry.path != path) {
            if let Some(bytes) = read_one_checked(&self.root, entry, chunk.offset, chunk, check)? {
                return Ok(Some(bytes));
            }
        }
        let elsewhere = self.store().chunk_locations(&chunk.hash)?;
        for (entry, offset) in elsewhere {
            if let Some(bytes) = read_one_checked(&self.root, &entry, offset, chunk, check)? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }
}

/// How a chunk read from a file the history describes is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadCheck {
    /// Its bytes are hashed.
    Hash,
    /// Its bytes are hashed unless the file's stat, before and after the read,
    /// passes the scanner's own test of an unchanged file ([`Stat::matches`]:
    /// size, mtime, ctime, inode, mode). A file recorded racily (see
    /// `scan::RACY_WINDOW_NS`) never passes it, and is always hashed.
    StatOrHash,
}

/// Reads `chunk` at `offset` of the file `entry` describes, if the file still is
/// what was hashed and the bytes have the chunk's hash.
pub(crate) fn read_verified(
    root: &Path,
    entry: &Entry,
    offset: u64,
    chunk: &ChunkInfo,
) -> Result<Option<Vec<u8>>> {
    read_one_checked(root, entry, offset, chunk, ReadCheck::Hash)
}

fn read_one_checked(
    root: &Path,
    entry: &Entry,
    offset: u64,
    chunk: &ChunkInfo,
    check: ReadCheck,
) -> Result<Option<Vec<u8>>> {
    Ok(read_checked(root, entry, &[(offset, chunk)], check)?
        .pop()
        .flatten())
}

/// Reads each chunk at its offset of the file `entry` describes, if the file
/// still is what was hashed, and checks it as `check` says; `None` for each that
/// is not there.
fn read_checked(
    root: &Path,
    entry: &Entry,
    wanted: &[(u64, &ChunkInfo)],
    check: ReadCheck,
) -> Result<Vec<Option<Vec<u8>>>> {
    let not_here = || Ok(vec![None; wanted.len()]);
    if entry.kind != Kind::File {
        return not_here();
    }
    let path = root.join(&entry.path);
    let file = match open_source(&path) {
        Ok(file) => file,
        Err(e) if is_gone(&e) => return not_here(),
        Err(e) => return Err(Error::io(&path, e)),
    };
    // `None` for what is not a regular file.
    let stat = |file: &File| -> Result<Option<Stat>> {
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        Ok(meta.is_file().then(|| Stat::of(&meta)))
    };
    let Some(before) = stat(&file)? else {
        return not_here();
    };
    if (before.size, before.mtime_ns) != (entry.size, entry.mtime_ns) {
        return not_here();
    }
    let mut read = Vec::with_capacity(wanted.len());
    for &(offset, chunk) in wanted {
        read.push(
            read_exact_at_unzeroed(&file, offset, chunk.len as usize)
                .map_err(|e| Error::io(&path, e))?,
        );
    }
    // A write moves the file's mtime and ctime before its bytes change, so bytes
    // read between two stats that match the entry are those that were hashed.
    if check == ReadCheck::StatOrHash && before.matches(entry) && stat(&file)? == Some(before) {
        return Ok(read);
    }
    Ok(read
        .into_iter()
        .zip(wanted)
        .map(|(bytes, (_, chunk))| bytes.filter(|bytes| Hash::of(bytes) == chunk.hash))
        .collect())
}

/// Copies `bytes` of the file `entry` describes into `output` at the same
/// offsets, if the file passes the scanner's test of an unchanged file before
/// and after the copy (as [`ReadCheck::StatOrHash`]): the bytes copied are then
/// those that were hashed. `false` otherwise.
fn copy_if_unchanged(
    root: &Path,
    entry: &Entry,
    bytes: Range<u64>,
    output: &File,
    output_path: &Path,
) -> Result<bool> {
    let path = root.join(&entry.path);
    let file = match open_source(&path) {
        Ok(file) => file,
        Err(e) if is_gone(&e) => return Ok(false),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let stat = |file: &File| {
        let meta = file.metadata().ok().filter(|meta| meta.is_file());
        meta.map(|meta| Stat::of(&meta))
    };
    let Some(before) = stat(&file).filter(|before| before.matches(entry)) else {
        return Ok(false);
    };
    match copy_range(
        &file,
        bytes.start,
        output,
        bytes.start,
        bytes.end - bytes.start,
    ) {
        Ok(()) => Ok(stat(&file) == Some(before)),
        // The file shrank meanwhile.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(output_path, e)),
    }
}

/// Opens a file of a folder to read chunks from: not through a symlink, and
/// without waiting on a FIFO put in its place.
pub(crate) fn open_source(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// `len` bytes of `file` from `offset`; `None` if it ends before. The buffer is
/// not zeroed first, since every byte of it is read: served chunks are most of
/// what a sending daemon reads.
fn read_exact_at_unzeroed(
    file: &File,
    offset: u64,
    len: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes: Vec<u8> = Vec::with_capacity(len);
    while bytes.len() < len {
        let filled = bytes.len();
        let spare = &mut bytes.spare_capacity_mut()[..len - filled];
        // SAFETY: `pread` writes at most `spare.len()` bytes into the vector's
        // spare capacity, and `set_len` below counts only those it wrote.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (offset + filled as u64) as libc::off_t,
            )
        };
        match read {
            0 => return Ok(None),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: the first `n` bytes of the spare capacity were just written.
            n => unsafe { bytes.set_len(filled + n as usize) },
        }
    }
    Ok(Some(bytes))
}

/// The path is not there (or a parent is not a directory, or it is a symlink
/// opened with O_NOFOLLOW).
pub(crate) fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}
