//! The merger: applies a [`Plan`] to the folder's disk and records what it did.
//!
//! Unison's invariant holds at every moment: each path holds either its old
//! content or its new one. New files are built in a temp file beside their path
//! (`.latus-tmp-*`), verified against their hash, and renamed into place; the
//! version they replace is kept in the trash (a hard link taken just before the
//! rename). Right before touching a path
//! its current state is compared with what the last scan recorded: a local change
//! the scan has not seen yet is never overwritten; the action waits for the next
//! round, after a rescan, and the rules decide again.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::chunk_store::{ChunkStore, new_token};
use crate::content::{ChunkInfo, ContentHasher, Hash, MIN_CHUNK, content_hash};
use crate::device::PeerId;
use crate::diff::{self, Action, ConflictCopy, Op, Plan};
use crate::error::{Error, Result};
use crate::folder::{Folder, TEMP_PREFIX, check_relative};
use crate::history::{Entry, HistoryStore, Kind, Record};
use crate::now_ns;
use crate::peer::{AskedChunks, Peer, is_gone, open_source, read_verified};
use crate::scan::RACY_WINDOW_NS;
use crate::trash::Trash;

const COPY_BUFFER: usize = 1 << 20;

pub struct MergeOptions {
    /// History records per transaction.
    pub batch_size: usize,
    /// Threads building new files ahead of the one placing them; 0 builds each
    /// file in turn (the order of a run is then fully reproducible).
    pub build_threads: usize,
    /// Stop after this many actions as if killed: records not yet committed are
    /// dropped (tests of interrupted syncs).
    pub interrupt_after: Option<usize>,
    /// Files built from a peer's chunks are assembled in `.latus/partial/`, named
    /// by their content, and kept when the build stops (a lost connection, a
    /// killed process): the next build of that content takes the chunks already
    /// there, each checked against its hash, and asks the peer for the rest only.
    pub resumable: bool,
    /// Told of each action done, for progress.
    pub observer: Option<Arc<dyn MergeObserver>>,
}

/// Hooks into a running merge, called from its placing thread.
pub trait MergeObserver: Send + Sync {
    /// One more action of the plan is done (applied, or left for the next
    /// round); `bytes` is the size of the file it built, if any.
    fn action_done(&self, bytes: u64);
}

/// The bytes of new content an action builds: what is left to transfer until
/// it is done.
pub fn bytes_to_build(action: &Action) -> u64 {
    if is_build(action) {
        action.target.size
    } else {
        0
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            batch_size: 1000,
            build_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            interrupt_after: None,
            resumable: false,
            observer: None,
        }
    }
}

/// What applying a plan did.
#[derive(Debug, Default, Serialize)]
pub struct MergeReport {
    pub applied: usize,
    /// Paths left for the next round: changed on disk since the last scan, or
    /// their content was not available.
    pub deferred: Vec<String>,
    pub conflicts: Vec<ConflictCopy>,
    /// Bytes copied from files already in this folder.
    pub bytes_local: u64,
    /// Bytes read from the peer.
    pub bytes_fetched: u64,
    /// Bytes found already fetched in a partial file of an earlier, stopped build.
    pub bytes_resumed: u64,
    pub warnings: Vec<String>,
    pub interrupted: bool,
}

/// Builds in flight per build thread: enough to keep them busy while the
/// placing thread catches up, few enough that an interruption wastes little.
const BUILDS_AHEAD_PER_THREAD: usize = 8;

/// Applies `plan` to `folder`, reading content it lacks from `peer`.
///
/// New files are built (read, verified, written to their temp file) by
/// `build_threads` threads, ahead of the one thread that places them in plan
/// order, checks each path right before, and records: only building is
/// parallel, so placing keeps every rule of a sequential run. Builds run ahead
/// only through a stretch of copies and replaces, never past another action.
pub fn apply(
    folder: &Folder,
    store: &mut HistoryStore,
    peer: &dyn Peer,
    plan: Plan,
    options: &MergeOptions,
) -> Result<MergeReport> {
    let shared = BuildShared {
        root: folder.root().to_path_buf(),
        history: folder.history_path(),
        peer,
        partial_dir: options
            .resumable
            .then(|| folder.marker_dir().join(PARTIAL_DIR)),
        assembling: std::sync::Mutex::new(HashSet::new()),
        chunk_store: std::sync::Mutex::new(None),
        marker_dir: folder.marker_dir(),
    };
    let mut merger = Merger {
        root: folder.root().to_path_buf(),
        replica: store.replica_id()?,
        store,
        builder: Builder::new(&shared),
        trash: Trash::new(folder),
        records: Vec::new(),
        report: MergeReport::default(),
        pending_chunks: Vec::new(),
        temp_prefix: format!("{TEMP_PREFIX}{}-", std::process::id()),
        tmp_counter: 0,
        ready_dirs: HashSet::new(),
    };
    let threads = match plan.actions.iter().any(is_build) {
        true => options.build_threads,
        false => 0,
    };
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<BuildJob>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for _ in 0..threads {
            let (jobs, done, shared) = (job_rx.clone(), done_tx.clone(), &shared);
            scope.spawn(move || build_worker(Builder::new(shared), jobs, done));
        }
        drop(done_tx);
        let mut builds = Builds {
            jobs: (threads > 0).then_some(job_tx),
            unstarted: job_rx,
            done: done_rx,
            in_flight: HashMap::new(),
            finished: HashMap::new(),
        };
        let applied = merger.apply_all(&plan.actions, &mut builds, threads, options);
        builds.abandon();
        applied
    })?;
    Ok(merger.report)
}

fn is_build(action: &Action) -> bool {
    matches!(action.op, Op::Copy { .. } | Op::Replace)
}

fn is_fatal(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
        Error::DiskFull(_) | Error::CorruptDatabase { .. } | Error::DatabaseLocked(_) => true,
        Error::Database { .. } => true,
        _ => false,
    }
}

/// A partial file untouched this long is removed even if a plan still builds its
/// content: the peer it came from may never offer that content again, and the
/// chunks in it are only a head start.
pub const PARTIAL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Removes the partial files of resumable builds ([`MergeOptions::resumable`])
/// that have no use any more: those whose content no plan builds now (its path
/// got another version, or was deleted, there or here), and those untouched for
/// `max_age`. A partial stays while the plan against some peer whose history was
/// received here builds its content, connected or not: that build resumes when
/// the peer is back.
///
/// Call it between merges, with the folder locked: it cannot tell a partial a
/// running build is writing. Returns how many files it removed.
pub fn clean_partials(folder: &Folder, store: &HistoryStore, max_age: Duration) -> Result<usize> {
    let dir = folder.marker_dir().join(PARTIAL_DIR);
    let listing = match fs::read_dir(&dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut partials = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let path = entry.path();
        // Not followed: a symlink here is not one of ours.
        let meta = entry.metadata().map_err(|e| Error::io(&path, e))?;
        if meta.is_file() {
            partials.push((path, entry.file_name(), meta.modified().ok()));
        }
    }
    // Planned only when there is something to clean: most rounds find nothing.
    if partials.is_empty() {
        return Ok(0);
    }
    let mut wanted = HashMap::new();
    for peer in store.remote_peers()? {
        for action in diff::plan(store, &peer)?.actions {
            if action.target.kind == Kind::File
                && let Some(hash) = action.target.hash
            {
                wanted.insert(hash.to_hex(), hash);
            }
        }
    }
    let now = SystemTime::now();
    let mut removed = 0;
    let mut kept = HashSet::new();
    for (path, name, modified) in partials {
        let too_old = modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > max_age);
        let content = name.to_str().and_then(|name| wanted.get(name));
        if let Some(content) = content.filter(|_| !too_old) {
            kept.insert(*content);
            continue;
        }
        if remove_if_present(&path)? {
            removed += 1;
        }
    }
    // The chunks recorded for the partial files removed go with them.
    ChunkStore::open(&folder.marker_dir())?.keep_only(&kept)?;
    Ok(removed)
}

/// A file to build into `temp`: the target version, and a local file that may
/// hold its content.
struct BuildJob {
    index: usize,
    temp: PathBuf,
    target: Entry,
    source: Option<Entry>,
}

/// A finished build: the chunk list to record and where the bytes came from.
/// `None` when some content was not available.
type BuildOutcome = Result<Option<Built>>;

#[derive(Default)]
struct Built {
    chunks: Vec<ChunkInfo>,
    bytes_local: u64,
    bytes_fetched: u64,
    bytes_resumed: u64,
}

/// In `.latus/`: files being assembled from a peer's chunks, by content hash.
pub const PARTIAL_DIR: &str = "partial";
/// Chunks in a window of a resumable build: it asks the peer for one window
/// while it writes the one before.
const CHUNKS_PER_WINDOW: usize = 16;

/// How old the history a build thread reads may be.
const SNAPSHOT_AGE: Duration = Duration::from_secs(1);

/// A resumable partial file stays private to its owner until it is finished.
const PARTIAL_MODE: u32 = 0o600;

fn build_worker(
    mut builder: Builder<'_>,
    jobs: crossbeam_channel::Receiver<BuildJob>,
    done: crossbeam_channel::Sender<(usize, BuildOutcome)>,
) {
    for job in jobs {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            builder.build(&job.target, job.source.as_ref(), &job.temp)
        }))
        .unwrap_or_else(|_| Err(Error::Internal("a build thread panicked".into())));
        if done.send((job.index, outcome)).is_err() {
            return;
        }
    }
}

/// The builds handed to the build threads and their outcomes, by action index.
struct Builds {
    /// `None` when there are no build threads: files are built in turn.
    jobs: Option<crossbeam_channel::Sender<BuildJob>>,
    /// The receiving end, to take back jobs not started when the run stops.
    unstarted: crossbeam_channel::Receiver<BuildJob>,
    done: crossbeam_channel::Receiver<(usize, BuildOutcome)>,
    in_flight: HashMap<usize, PathBuf>,
    finished: HashMap<usize, BuildOutcome>,
}

impl Builds {
    /// The outcome of the build of action `index` and its temp file, waiting for
    /// it; `None` if it was never handed out.
    fn take(&mut self, index: usize) -> Option<(PathBuf, BuildOutcome)> {
        let temp = self.in_flight.remove(&index)?;
        while !self.finished.contains_key(&index) {
            match self.done.recv() {
                Ok((i, outcome)) => {
                    self.finished.insert(i, outcome);
                }
                Err(_) => {
                    let stopped = Error::Internal("the build threads stopped".into());
                    self.finished.insert(index, Err(stopped));
                }
            }
        }
        let outcome = self.finished.remove(&index)?;
        Some((temp, outcome))
    }

    /// Stops handing out builds and removes the temp files of those not placed.
    fn abandon(&mut self) {
        self.jobs = None;
        for job in self.unstarted.try_iter() {
            self.in_flight.remove(&job.index);
        }
        let left: Vec<usize> = self.in_flight.keys().copied().collect();
        for index in left {
            if let Some((temp, _)) = self.take(index) {
                let _ = fs::remove_file(temp);
            }
        }
    }
}

/// What a resumable build starts from: the chunks its partial file holds (by
/// index in the content's chunk list, as the chunk store records them), and the
/// token it asks for the others with.
struct Resume {
    complete: HashSet<u32>,
    token: i64,
}

/// A window of a resumable build's chunks (at most [`CHUNKS_PER_WINDOW`]).
struct Window<'c, 'p> {
    chunks: &'c [ChunkInfo],
    /// The index of its first chunk in the content's chunk list.
    first: u32,
    /// Each chunk's bytes once placed: `None` for those already in the partial
    /// file, and for the missing ones until they arrive.
    placed: Vec<Option<Vec<u8>>>,
    /// Where the chunks asked of the peer go in `placed`, in the order asked.
    missing: Vec<usize>,
    asked: Option<AskedChunks<'p>>,
}

/// What every build thread shares.
struct BuildShared<'a> {
    root: PathBuf,
    history: PathBuf,
    peer: &'a dyn Peer,
    /// Where resumable builds are assembled; `None` when builds are not resumable.
    partial_dir: Option<PathBuf>,
    /// Contents a thread is assembling in `partial_dir` now.
    assembling: std::sync::Mutex<HashSet<Hash>>,
    /// The state of the chunks of resumable builds: opened with the first.
    chunk_store: std::sync::Mutex<Option<ChunkStore>>,
    marker_dir: PathBuf,
}

impl BuildShared<'_> {
    /// Runs `work` on the chunk store, opening it first if need be.
    fn chunk_store<T>(&self, work: impl FnOnce(&ChunkStore) -> Result<T>) -> Result<T> {
        let mut slot = self.chunk_store.lock().unwrap_or_else(|p| p.into_inner());
        let store = match &mut *slot {
            Some(store) => store,
            empty => empty.insert(ChunkStore::open(&self.marker_dir)?),
        };
        work(store)
    }
}

/// Builds new files in temp files: from a local copy, from chunks this folder
/// holds, or from the peer. One per thread, each with its own reading
/// connection to the folder's history.
struct Builder<'a> {
    shared: &'a BuildShared<'a>,
    store: Option<HistoryStore>,
    /// When `store`'s snapshot was taken.
    snapshot_at: Option<Instant>,
}

impl<'c> Window<'c, '_> {
    fn of(chunks: &'c [ChunkInfo], first: u32) -> Self {
        Window {
            chunks,
            first,
            placed: Vec::with_capacity(chunks.len()),
            missing: Vec::new(),
            asked: None,
        }
    }
}

impl<'a> Builder<'a> {
    fn new(shared: &'a BuildShared<'a>) -> Self {
        Builder {
            shared,
            store: None,
            snapshot_at: None,
        }
    }

    /// Builds `target` into `temp`, first from `source` when given.
    fn build(&mut self, target: &Entry, source: Option<&Entry>, temp: &Path) -> BuildOutcome {
        let built = match source {
            Some(source) => match self.copy_local(source, target, temp)? {
                Some(built) => Some(built),
                None => self.build_from_chunks(target, temp)?,
            },
            None => self.build_from_chunks(target, temp)?,
        };
        if built.is_none() {
            let _ = fs::remove_file(temp);
        }
        Ok(built)
    }

    /// The history as of at most [`SNAPSHOT_AGE`] ago: enough to find local
    /// copies of chunks (each is checked on disk before use), and a query per
    /// file then costs no lock nor page reads while the placing thread commits.
    fn store(&mut self) -> Result<&HistoryStore> {
        let store = match &mut self.store {
            Some(store) => store,
            slot => slot.insert(HistoryStore::open_read_only(&self.shared.history)?),
        };
        if self
            .snapshot_at
            .is_none_or(|at| at.elapsed() >= SNAPSHOT_AGE)
        {
            store.renew_snapshot()?;
            self.snapshot_at = Some(Instant::now());
        }
        Ok(store)
    }

    /// Copies a file of this folder that has the target's content; `None` if it
    /// no longer has it.
    fn copy_local(&mut self, source: &Entry, target: &Entry, temp: &Path) -> BuildOutcome {
        let mut sources = LocalSources::default();
        let Some(input) = sources.open(&self.shared.root, source)? else {
            return Ok(None);
        };
        let output = create_temp(temp, target)?;
        // Copied unread (a clone where the file system can), then checked whole.
        let copy = LocalRun {
            source: input,
            from: 0,
            to: 0,
            len: source.size,
        };
        let same = match copy.copy(&sources, &output, temp) {
            Ok(()) => Some(hash_file(&output, temp)?) == target.hash,
            // The source shrank while it was copied.
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::UnexpectedEof => false,
            Err(e) => {
                let _ = fs::remove_file(temp);
                return Err(e);
            }
        };
        if !same {
            let _ = fs::remove_file(temp);
            return Ok(None);
        }
        finish_file(output, temp, target, file_mode(target))?;
        Ok(Some(Built {
            // The content is this folder's already: so is its chunk list.
            chunks: Vec::new(),
            bytes_local: source.size,
            bytes_fetched: 0,
            bytes_resumed: 0,
        }))
    }

    /// Builds the target from its chunks: from this folder where it holds them,
    /// else from the peer. `None` if some chunk is not available.
    fn build_from_chunks(&mut self, target: &Entry, temp: &Path) -> BuildOutcome {
        let Some(content) = target.hash else {
            return Err(Error::Peer(format!(
                "{}: a file without a hash",
                target.path
            )));
        };
        // A content no longer than the smallest chunk is that one chunk: there is
        // no list to ask the peer for.
        let mut chunks = if target.size <= MIN_CHUNK as u64 {
            Vec::new()
        } else {
            self.shared.peer.chunks_of(&content)?
        };
        if chunks.is_empty() && target.size > 0 {
            chunks.push(ChunkInfo {
                hash: content,
                offset: 0,
                len: u32::try_from(target.size).unwrap_or(u32::MAX),
            });
        }
        let mut expected_offset = 0;
        for chunk in &chunks {
            if chunk.offset != expected_offset {
                return Err(Error::Peer(format!("{}: a bad chunk list", target.path)));
            }
            expected_offset += u64::from(chunk.len);
        }
        if expected_offset != target.size {
            return Err(Error::Peer(format!("{}: a bad chunk list", target.path)));
        }
        // With the list bound to the content, verified chunks make the content:
        // the assembled file need not be read again.
        if content_hash(&chunks) != content {
            return Err(Error::Peer(format!(
                "{}: a chunk list that does not make the content",
                target.path
            )));
        }
        // A content of one chunk has nothing to resume: it is fetched whole.
        if let Some(partial) = (chunks.len() > 1)
            .then(|| self.claim_partial(content))
            .flatten()
        {
            let assembled = self.assemble_resumable(target, content, &chunks, &partial);
            self.shared
                .assembling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&content);
            return match assembled? {
                Some(built) => {
                    fs::rename(&partial, temp).map_err(|e| Error::io(temp, e))?;
                    self.shared.chunk_store(|store| store.forget(&content))?;
                    Ok(Some(Built { chunks, ..built }))
                }
                None => Ok(None),
            };
        }
        // Local chunks are first copied as ranges, unread (a clone on file systems
        // with reflinks); only if the result is not the content, because a
        // source changed meanwhile, each local chunk is read and checked.
        for ranges in [true, false] {
            match self.assemble(target, content, &chunks, temp, ranges)? {
                Assembled::Done(built) => {
                    return Ok(Some(Built { chunks, ..built }));
                }
                Assembled::Unavailable => return Ok(None),
                Assembled::LocalChanged => {
                    let _ = fs::remove_file(temp);
                }
            }
        }
        Ok(None)
    }

    /// Writes `chunks` (a list that makes `content`) into `temp`, each chunk
    /// checked against its hash. With `ranges`, runs of chunks held by a local
    /// file are copied file to file unread and checked in `temp` afterwards;
    /// otherwise each local chunk is checked as it is read.
    fn assemble(
        &mut self,
        target: &Entry,
        content: Hash,
        chunks: &[ChunkInfo],
        temp: &Path,
        ranges: bool,
    ) -> Result<Assembled> {
        let output = create_temp(temp, target)?;
        let mut built = Built::default();
        let mut sources = LocalSources::default();
        let mut run: Option<LocalRun> = None;
        // Chunks copied file to file unread, checked once the copies are done.
        let mut copied_unread = Vec::new();
        // Adjacent chunks to come from the peer, asked for together.
        let mut from_peer: Vec<ChunkInfo> = Vec::new();
        for chunk in chunks {
            if !ranges {
                let one = std::slice::from_ref(chunk);
                if let Some(bytes) = self.local_chunk(chunk)? {
                    built.bytes_local += bytes.len() as u64;
                    output
                        .write_all_at(&bytes, chunk.offset)
                        .map_err(|e| Error::io(temp, e))?;
                } else if !self.fetch(target, &content, one, &output, temp, &mut built)? {
                    return Ok(Assembled::Unavailable);
                }
                continue;
            }
            // Bytes asked for ahead are here or on their way: a local copy
            // would only cost the lookup.
            let local = match self.shared.peer.asked_ahead(&chunk.hash) {
                true => None,
                false => self.local_range(chunk, run.as_ref(), &mut sources)?,
            };
            let Some(next) = local else {
                if let Some(done) = run.take() {
                    done.copy(&sources, &output, temp)?;
                }
                from_peer.push(*chunk);
                continue;
            };
            if !self.fetch(target, &content, &from_peer, &output, temp, &mut built)? {
                return Ok(Assembled::Unavailable);
            }
            from_peer.clear();
            built.bytes_local += u64::from(chunk.len);
            copied_unread.push(*chunk);
            match &mut run {
                Some(current) if current.continues_with(&next) => current.len += next.len,
                _ => {
                    if let Some(done) = run.replace(next) {
                        done.copy(&sources, &output, temp)?;
                    }
                }
            }
        }
        if !self.fetch(target, &content, &from_peer, &output, temp, &mut built)? {
            return Ok(Assembled::Unavailable);
        }
        if let Some(done) = run.take() {
            done.copy(&sources, &output, temp)?;
        }
        if !chunks_match(&output, temp, &copied_unread)? {
            return Ok(Assembled::LocalChanged);
        }
        finish_file(output, temp, target, file_mode(target))?;
        Ok(Assembled::Done(built))
    }

    /// Writes `run` (adjacent chunks of `content`) into `output` from the peer:
    /// copied file to file where the peer can vouch for the bytes unread, else
    /// read chunk by chunk, each checked against its hash (the peer checks what
    /// it returns). `false` if some chunk is not available.
    fn fetch(
        &self,
        target: &Entry,
        content: &Hash,
        run: &[ChunkInfo],
        output: &File,
        temp: &Path,
        built: &mut Built,
    ) -> Result<bool> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(true);
        };
        let bytes = first.offset..last.offset + u64::from(last.len);
        // One chunk costs less to hash than the lookup of the file that holds it.
        if run.len() > 1
            && self
                .shared
                .peer
                .copy_unread(&target.path, content, bytes.clone(), output, temp)?
        {
            built.bytes_fetched += bytes.end - bytes.start;
            return Ok(true);
        }
        for chunk in run {
            let Some(bytes) = self.shared.peer.read_chunk(&target.path, content, chunk)? else {
                return Ok(false);
            };
            built.bytes_fetched += bytes.len() as u64;
            output
                .write_all_at(&bytes, chunk.offset)
                .map_err(|e| Error::io(temp, e))?;
        }
        Ok(true)
    }

    /// The partial file to assemble `content` in, if builds are resumable and no
    /// other thread is assembling the same content.
    fn claim_partial(&self, content: Hash) -> Option<PathBuf> {
        let dir = self.shared.partial_dir.as_ref()?;
        let claimed = self
            .shared
            .assembling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(content);
        if !claimed || fs::create_dir_all(dir).is_err() {
            return None;
        }
        Some(dir.join(content.to_hex()))
    }

    /// Assembles the target in `partial`, keeping the chunks an earlier build
    /// left there (those the chunk store records complete, each checked against
    /// its hash); `None` when the peer no longer has some chunk (the partial
    /// file stays for the next try).
    fn assemble_resumable(
        &mut self,
        target: &Entry,
        content: Hash,
        chunks: &[ChunkInfo],
        partial: &Path,
    ) -> Result<Option<Built>> {
        let output = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PARTIAL_MODE)
            .open(partial)
            .map_err(|e| Error::io(partial, e))?;
        let token = new_token();
        let (replaced, complete) = self.shared.chunk_store(|store| {
            let replaced = store.start_build(&target.path, &content, token)?;
            Ok((replaced, store.complete(&content)?))
        })?;
        let resume = Resume { complete, token };
        if let Some(replaced) = replaced {
            self.drop_partial(replaced)?;
        }
        reserve_blocks(&output, target.size).map_err(|e| Error::io(partial, e))?;
        let mut built = Built::default();
        // Writes the chunks of a window that are here, in runs of adjacent
        // chunks (one write, and one inotify event, each); returns their indices.
        let write = |window: &Window<'_, '_>| -> Result<Vec<u32>> {
            let placed = &window.placed;
            let mut at = 0;
            while at < placed.len() {
                let run: Vec<&[u8]> = placed[at..]
                    .iter()
                    .map_while(|bytes| bytes.as_deref())
                    .collect();
                if !run.is_empty() {
                    write_all_vectored_at(&output, &run, window.chunks[at].offset)
                        .map_err(|e| Error::io(partial, e))?;
                }
                at += run.len().max(1);
            }
            Ok((0..placed.len())
                .filter(|&i| placed[i].is_some())
                .map(|i| window.first + i as u32)
                .collect())
        };
        // One transaction per window: the chunks written, with those the next
        // window asked for (recorded a little late, which no restart minds:
        // chunks asked for by a build that is gone count as not started).
        let record = |complete: &[u32], next: Option<&Window<'_, '_>>| {
            let asked: Vec<u32> = next.map_or_else(Vec::new, |next| {
                let at = |i: &usize| next.first + *i as u32;
                next.missing.iter().map(at).collect()
            });
            self.shared
                .chunk_store(|store| store.record(&content, complete, &asked, resume.token))
        };
        // Each window's chunks are asked for before the previous window's are
        // awaited and written: the peer is never left idle in between.
        let mut previous = None;
        let windows = chunks.chunks(CHUNKS_PER_WINDOW).enumerate().map(Some);
        for window in windows.chain(std::iter::once(None)) {
            let next = match window {
                Some((n, chunks)) => {
                    let first = (n * CHUNKS_PER_WINDOW) as u32;
                    let window = Window::of(chunks, first);
                    Some(self.open_window(target, &content, window, &output, &resume, &mut built)?)
                }
                None => None,
            };
            let Some(mut window) = std::mem::replace(&mut previous, next) else {
                record(&[], previous.as_ref())?;
                continue;
            };
            if let Some(asked) = window.asked.take() {
                let fetched = asked()?;
                if fetched.len() != window.missing.len() {
                    return Err(Error::Peer(format!(
                        "{}: the peer answered {} of {} chunks",
                        target.path,
                        fetched.len(),
                        window.missing.len()
                    )));
                }
                let mut all_here = true;
                for (index, bytes) in window.missing.iter().zip(fetched) {
                    match bytes {
                        Some(bytes) => {
                            built.bytes_fetched += bytes.len() as u64;
                            window.placed[*index] = Some(bytes);
                        }
                        None => all_here = false,
                    }
                }
                if !all_here {
                    // What did arrive stays in the partial file for the next try.
                    record(&write(&window)?, None)?;
                    return Ok(None);
                }
            }
            record(&write(&window)?, previous.as_ref())?;
        }
        output
            .set_len(target.size)
            .map_err(|e| Error::io(partial, e))?;
        finish_file(output, partial, target, PARTIAL_MODE)?;
        Ok(Some(built))
    }

    /// Fills `window` with the chunks found in the partial file (those recorded
    /// complete that still have their hash there) or elsewhere in this folder,
    /// and asks the peer for the rest (recorded by the caller).
    fn open_window<'c>(
        &mut self,
        target: &Entry,
        content: &Hash,
        mut window: Window<'c, 'a>,
        partial: &File,
        resume: &Resume,
        built: &mut Built,
    ) -> Result<Window<'c, 'a>> {
        let mut buffer = Vec::new();
        let mut wanted = Vec::new();
        for (i, chunk) in window.chunks.iter().enumerate() {
            let index = window.first + i as u32;
            // Checked: a power loss may have kept the record and lost the bytes.
            if resume.complete.contains(&index)
                && matches!(holds_chunk(partial, chunk, &mut buffer), Ok(true))
            {
                built.bytes_resumed += u64::from(chunk.len);
                window.placed.push(None);
            } else if let Some(bytes) = self.local_chunk(chunk)? {
                built.bytes_local += bytes.len() as u64;
                window.placed.push(Some(bytes));
            } else {
                window.missing.push(i);
                wanted.push(*chunk);
                window.placed.push(None);
            }
        }
        if !wanted.is_empty() {
            window.asked = Some(
                self.shared
                    .peer
                    .ask_for_chunks(&target.path, content, &wanted),
            );
        }
        Ok(window)
    }

    /// Removes the partial file of `content` and forgets its chunks, unless a
    /// build is assembling it now.
    fn drop_partial(&self, content: Hash) -> Result<()> {
        let Some(dir) = &self.shared.partial_dir else {
            return Ok(());
        };
        let assembling = self
            .shared
            .assembling
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if assembling.contains(&content) {
            return Ok(());
        }
        remove_if_present(&dir.join(content.to_hex()))?;
        drop(assembling);
        self.shared.chunk_store(|store| store.forget(&content))
    }

    /// Where this folder holds `chunk` (a file that still has the size and mtime
    /// it was hashed with), preferring the place that continues `run`.
    fn local_range(
        &mut self,
        chunk: &ChunkInfo,
        run: Option<&LocalRun>,
        sources: &mut LocalSources,
    ) -> Result<Option<LocalRun>> {
        let store = self.store()?;
        if !store.may_hold_chunk(&chunk.hash)? {
            return Ok(None);
        }
        let mut found = None;
        for (entry, offset) in store.chunk_locations(&chunk.hash)? {
            if offset + u64::from(chunk.len) > entry.size {
                continue;
            }
            let Some(source) = sources.open(&self.shared.root, &entry)? else {
                continue;
            };
            let here = LocalRun {
                source,
                from: offset,
                to: chunk.offset,
                len: u64::from(chunk.len),
            };
            if run.is_some_and(|run| run.continues_with(&here)) {
                return Ok(Some(here));
            }
            found.get_or_insert(here);
        }
        Ok(found)
    }

    /// `chunk` read from a file of this folder that holds it, if any does.
    fn local_chunk(&mut self, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        let store = self.store()?;
        if !store.may_hold_chunk(&chunk.hash)? {
            return Ok(None);
        }
        for (entry, offset) in store.chunk_locations(&chunk.hash)? {
            if let Some(bytes) = read_verified(&self.shared.root, &entry, offset, chunk)? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }
}

enum Assembled {
    Done(Built),
    /// Some content was not available from the peer.
    Unavailable,
    /// A local file copied unread changed meanwhile: the result is not the content.
    LocalChanged,
}

/// Local files opened as chunk sources during one build, each checked once
/// against the size and mtime it was hashed with.
#[derive(Default)]
struct LocalSources {
    files: Vec<File>,
    by_path: HashMap<String, Option<usize>>,
}

impl LocalSources {
    /// The index of the open file `entry` describes; `None` if it is no longer that file.
    fn open(&mut self, root: &Path, entry: &Entry) -> Result<Option<usize>> {
        if let Some(known) = self.by_path.get(&entry.path) {
            return Ok(*known);
        }
        let path = root.join(&entry.path);
        let opened = match open_source(&path) {
            Ok(file) => {
                let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
                let same = meta.is_file()
                    && meta.size() == entry.size
                    && mtime_of(&meta) == entry.mtime_ns;
                same.then(|| {
                    self.files.push(file);
                    self.files.len() - 1
                })
            }
            Err(e) if is_gone(&e) => None,
            Err(e) => return Err(Error::io(&path, e)),
        };
        self.by_path.insert(entry.path.clone(), opened);
        Ok(opened)
    }
}

/// Bytes `from..from+len` of a local source, to go at `to` in the new file.
struct LocalRun {
    source: usize,
    from: u64,
    to: u64,
    len: u64,
}

impl LocalRun {
    fn continues_with(&self, next: &LocalRun) -> bool {
        next.source == self.source
            && next.from == self.from + self.len
            && next.to == self.to + self.len
    }

    fn copy(&self, sources: &LocalSources, output: &File, temp: &Path) -> Result<()> {
        let input = &sources.files[self.source];
        copy_range(input, self.from, output, self.to, self.len).map_err(|e| Error::io(temp, e))
    }
}

/// Copies `len` bytes between two files with `copy_file_range`: in the kernel,
/// and as a clone of the extents where the file system has reflinks (XFS,
/// Btrfs), so an append to a large file writes little more than the appended
/// bytes there. Falls back to reading and writing where the call is refused.
pub(crate) fn copy_range(
    input: &File,
    from: u64,
    output: &File,
    to: u64,
    len: u64,
) -> std::io::Result<()> {
    let (mut from, mut to, mut left) = (from, to, len);
    while left > 0 {
        let mut off_in = from as libc::loff_t;
        let mut off_out = to as libc::loff_t;
        // SAFETY: both descriptors are open for the duration of the call and the
        // offsets are plain integers the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut off_in,
                output.as_raw_fd(),
                &mut off_out,
                left.min(1 << 30) as usize,
                0,
            )
        };
        match n {
            n if n > 0 => {
                let n = n as u64;
                from += n;
                to += n;
                left -= n;
            }
            0 => return Err(std::io::Error::from(ErrorKind::UnexpectedEof)),
            _ => {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_range_by_reading(input, from, output, to, left);
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(())
}

fn copy_range_by_reading(
    input: &File,
    mut from: u64,
    output: &File,
    mut to: u64,
    mut left: u64,
) -> std::io::Result<()> {
    let mut buffer = vec![0; COPY_BUFFER];
    while left > 0 {
        let n = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        input.read_exact_at(&mut buffer[..n], from)?;
        output.write_all_at(&buffer[..n], to)?;
        (from, to, left) = (from + n as u64, to + n as u64, left - n as u64);
    }
    Ok(())
}

/// Writes `parts` one after the other from `offset`, in as few system calls as
/// the kernel takes.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut offset: u64) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice> = parts.iter().map(|part| IoSlice::new(part)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let count = slices.len().min(IOV_MAX);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the first
        // `count` slices borrow live buffers for the duration of the call.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        match written {
            0 => return Err(ErrorKind::WriteZero.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => {
                offset += n as u64;
                IoSlice::advance_slices(&mut slices, n as usize);
            }
        }
    }
    Ok(())
}

/// The most slices one `pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The content hash of a whole file, read from its start.
fn hash_file(file: &File, path: &Path) -> Result<Hash> {
    let mut reader = ReadFrom { file, offset: 0 };
    ContentHasher::default()
        .hash_reader(&mut reader, |_| {})
        .map(|hashed| hashed.hash)
        .map_err(|e| Error::io(path, e))
}

/// Whether each of `chunks` in `file` has its hash.
fn chunks_match(file: &File, path: &Path, chunks: &[ChunkInfo]) -> Result<bool> {
    let mut buffer = Vec::new();
    for chunk in chunks {
        if !holds_chunk(file, chunk, &mut buffer).map_err(|e| Error::io(path, e))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `file` holds `chunk` at its offset, read into `buffer`.
fn holds_chunk(file: &File, chunk: &ChunkInfo, buffer: &mut Vec<u8>) -> std::io::Result<bool> {
    buffer.resize(chunk.len as usize, 0);
    file.read_exact_at(buffer, chunk.offset)?;
    Ok(Hash::of(buffer) == chunk.hash)
}

/// Reads a file from `offset` on without moving its cursor.
struct ReadFrom<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for ReadFrom<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Files from this size on have their blocks reserved before they are written
/// ([`reserve_blocks`]); for smaller ones the call would cost more than it saves.
const RESERVE_FROM: u64 = 1 << 20;

/// Reserves the blocks of a file about to be written up to `len` bytes, without
/// changing its length (which tells a resumed build what it holds). Writing
/// into reserved blocks costs ext4 about half the CPU of allocating them as it
/// goes (512 MiB in 1 MiB writes: 0.055 s against 0.10 s of system time), and
/// a disk too full for the file says so before anything is fetched. On a file
/// system that cannot reserve, the file is written as before.
fn reserve_blocks(file: &File, len: u64) -> std::io::Result<()> {
    let Ok(len) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    if len < RESERVE_FROM as libc::off_t {
        return Ok(());
    }
    // SAFETY: the descriptor is open for the duration of the call; the kernel
    // reads only the integers passed.
    let done = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if done == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            // ext4 keeps what it reserved before it ran out: all the free space.
            // Truncating to the length frees the blocks past it.
            if let Ok(meta) = file.metadata() {
                let _ = file.set_len(meta.len());
            }
            Err(err)
        }
        _ => Ok(()),
    }
}

/// Creates the temp file for `target` with its permissions already (the umask
/// permitting): no chmod afterwards, and one file-system event less per file
/// for the watchers of this folder, our own included.
fn create_temp(temp: &Path, target: &Entry) -> Result<File> {
    File::options()
        .read(true) // to check what was copied into it unread
        .write(true)
        .create_new(true)
        .mode(file_mode(target))
        .open(temp)
        .map_err(|e| Error::io(temp, e))
}

struct Merger<'a> {
    root: PathBuf,
    replica: PeerId,
    store: &'a mut HistoryStore,
    /// Builds on this thread: a move whose source changed.
    builder: Builder<'a>,
    trash: Trash,
    records: Vec<Record>,
    report: MergeReport,
    /// The chunk list of the file just built, recorded with its entry.
    pending_chunks: Vec<ChunkInfo>,
    /// Temp names: the prefix the scan skips, and this process's id.
    temp_prefix: String,
    tmp_counter: u64,
    /// Parents checked (real directories, not symlinks) in this run.
    ready_dirs: HashSet<String>,
}

impl Merger<'_> {
    fn apply_all(
        &mut self,
        actions: &[Action],
        builds: &mut Builds,
        threads: usize,
        options: &MergeOptions,
    ) -> Result<()> {
        let ahead = threads * BUILDS_AHEAD_PER_THREAD;
        let mut handed_out = 0;
        for (done, action) in actions.iter().enumerate() {
            if options.interrupt_after.is_some_and(|n| done >= n) {
                self.report.interrupted = true;
                return Ok(());
            }
            handed_out = handed_out.max(done);
            // The window is refilled when half empty: what the peer is asked
            // for ahead goes in batches.
            if handed_out < done + ahead.div_ceil(2) {
                let start = handed_out;
                while handed_out < actions.len()
                    && handed_out < done + ahead
                    && is_build(&actions[handed_out])
                {
                    handed_out += 1;
                }
                self.hand_out_all(start, &actions[start..handed_out], builds);
            }
            let outcome = match builds.take(done) {
                Some((temp, built)) => self.place_built(action, &temp, built),
                None => self.run(action),
            };
            match outcome {
                Ok(true) => self.report.applied += 1,
                Ok(false) => self.report.deferred.push(action.path().to_string()),
                Err(e) if is_fatal(&e) => {
                    self.commit()?;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", action.describe());
                    self.report
                        .warnings
                        .push(format!("{}: {e}", action.describe()));
                    self.report.deferred.push(action.path().to_string());
                }
            }
            if let Some(observer) = &options.observer {
                observer.action_done(bytes_to_build(action));
            }
            if self.records.len() >= options.batch_size {
                self.commit()?;
            }
        }
        self.commit()
    }

    /// Hands out the builds of `actions` (from index `start` of the plan), after
    /// telling the peer which single-chunk contents they will ask it for. Those
    /// it asks for ahead are built on this thread when their turn comes: for a
    /// file of a few KiB, handing it to a build thread costs more (two thread
    /// wakeups, and the threads' file creations contending for the directory's
    /// lock) than writing it here, and waiting for the network is done ahead.
    fn hand_out_all(&mut self, start: usize, actions: &[Action], builds: &mut Builds) {
        if builds.jobs.is_none() {
            return;
        }
        let (indices, wanted): (Vec<usize>, Vec<(&str, Hash, ChunkInfo)>) = actions
            .iter()
            .enumerate()
            .filter(|(_, action)| matches!(action.op, Op::Replace))
            .filter_map(|(index, action)| {
                let target = &action.target;
                let hash = target.hash.filter(|_| target.kind == Kind::File)?;
                let len = u32::try_from(target.size).ok()?;
                (len > 0 && len as usize <= MIN_CHUNK).then_some((
                    index,
                    (
                        target.path.as_str(),
                        hash,
                        ChunkInfo {
                            hash,
                            offset: 0,
                            len,
                        },
                    ),
                ))
            })
            .unzip();
        let asked = self.builder.shared.peer.prefetch(&wanted);
        let built_here: HashSet<usize> = indices.into_iter().take(asked).collect();
        for (offset, action) in actions.iter().enumerate() {
            if !built_here.contains(&offset) {
                self.hand_out(start + offset, action, builds);
            }
        }
    }

    /// Hands the build of `action` to the build threads (its temp file's parent
    /// is made ready here, in plan order). A failure to do so is left for
    /// [`Merger::run`] to meet again when the action's turn comes.
    fn hand_out(&mut self, index: usize, action: &Action, builds: &mut Builds) {
        let Some(jobs) = &builds.jobs else {
            return;
        };
        let Ok(temp) = check_relative(action.path()).and_then(|()| self.temp_path(action.path()))
        else {
            return;
        };
        let source = match &action.op {
            Op::Copy { source } => Some(Entry::clone(source)),
            _ => None,
        };
        let job = BuildJob {
            index,
            temp: temp.clone(),
            target: action.target.clone(),
            source,
        };
        if jobs.send(job).is_ok() {
            builds.in_flight.insert(index, temp);
        }
    }

    fn commit(&mut self) -> Result<()> {
        if !self.records.is_empty() {
            self.store.write_batch(&self.records)?;
            self.records.clear();
        }
        Ok(())
    }

    /// Runs one action; `Ok(false)` when it must wait for a rescan.
    fn run(&mut self, action: &Action) -> Result<bool> {
        let rel = action.path();
        check_relative(rel)?;
        let abs = self.root.join(rel);
        match &action.op {
            Op::ConflictCopy { copy_path } => {
                check_relative(copy_path)?;
                let Some(current) = &action.current else {
                    return Ok(false);
                };
                self.prepare_parent(copy_path)?;
                if !disk_matches(&abs, Some(current))? {
                    return Ok(false);
                }
                let copy_abs = self.root.join(copy_path);
                if !rename_no_replace(&abs, &copy_abs)? {
                    return Ok(false);
                }
                let copy = Entry {
                    path: copy_path.clone(),
                    ..action.target.clone()
                };
                self.record(&copy, &copy_abs)?;
                self.report.conflicts.push(ConflictCopy {
                    path: rel.to_string(),
                    copy_path: copy_path.clone(),
                });
                Ok(true)
            }
            Op::Delete => self.delete(action, &abs),
            Op::MakeDir => {
                self.prepare_parent(rel)?;
                match fs::symlink_metadata(&abs) {
                    // A directory made here meanwhile is the same directory.
                    Ok(meta) if meta.is_dir() => {}
                    _ => {
                        if !disk_matches(&abs, action.current.as_ref())? {
                            return Ok(false);
                        }
                        if action.current.is_some() {
                            self.trash.take(&self.root, rel)?;
                        }
                        fs::create_dir(&abs).map_err(|e| Error::io(&abs, e))?;
                    }
                }
                set_mode(&abs, action.target.mode)?;
                self.record(&action.target, &abs)?;
                Ok(true)
            }
            Op::SetMeta => {
                if !disk_matches(&abs, action.current.as_ref())? {
                    return Ok(false);
                }
                self.set_meta(&abs, &action.target)?;
                self.record(&action.target, &abs)?;
                Ok(true)
            }
            Op::Symlink => {
                let target = action.target.link_target.as_deref().unwrap_or_default();
                let temp = self.temp_path(action.path())?;
                symlink(target, &temp).map_err(|e| Error::io(&temp, e))?;
                set_mtime(&temp, action.target.mtime_ns)?;
                self.place(action, &temp)
            }
            Op::Move {
                source,
                source_deletion,
            } => {
                let from = self.root.join(&source.path);
                check_relative(&source.path)?;
                if !disk_matches(&from, Some(source))? {
                    return self.build_and_place(action);
                }
                self.prepare_parent(rel)?;
                if !disk_matches(&abs, action.current.as_ref())? {
                    return Ok(false);
                }
                if !self.replace_with(action, &from)? {
                    return Ok(false);
                }
                self.set_meta(&abs, &action.target)?;
                self.record(&action.target, &abs)?;
                self.record(source_deletion, &from)?;
                Ok(true)
            }
            Op::Copy { .. } | Op::Replace => self.build_and_place(action),
        }
    }

    fn delete(&mut self, action: &Action, abs: &Path) -> Result<bool> {
        let Some(current) = &action.current else {
            return Ok(true);
        };
        if !disk_matches(abs, Some(current))? {
            return Ok(false);
        }
        if current.kind != Kind::Dir {
            self.trash.take(&self.root, action.path())?;
            self.record(&action.target, abs)?;
            return Ok(true);
        }
        match self.remove_dir(abs) {
            Ok(()) => {
                self.record(&action.target, abs)?;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                self.keep_dir(current, abs)?;
                Ok(true)
            }
            Err(e) => Err(Error::io(abs, e)),
        }
    }

    /// A directory the peer removed still holds content that is not synced (or is
    /// ignored): it stays, as a new version of its own, which brings it back on
    /// the other side.
    fn keep_dir(&mut self, current: &Entry, abs: &Path) -> Result<()> {
        let kept = Entry {
            author_peerid: self.replica,
            author_utime_ns: now_ns(),
            ..current.clone()
        };
        self.record(&kept, abs)?;
        self.report.warnings.push(format!(
            "{}: directory kept, it holds content that is not synced",
            current.path
        ));
        Ok(())
    }

    /// Builds the target file in a temp file (copied from a local source, else
    /// from chunks) on this thread and renames it into place.
    fn build_and_place(&mut self, action: &Action) -> Result<bool> {
        let temp = self.temp_path(action.path())?;
        let source = match &action.op {
            Op::Copy { source } | Op::Move { source, .. } => Some(&**source),
            _ => None,
        };
        let built = self.builder.build(&action.target, source, &temp);
        self.place_built(action, &temp, built)
    }

    fn place_built(&mut self, action: &Action, temp: &Path, built: BuildOutcome) -> Result<bool> {
        let built = match built {
            Ok(Some(built)) => built,
            Ok(None) => return Ok(false),
            Err(e) => {
                let _ = fs::remove_file(temp);
                return Err(e);
            }
        };
        self.report.bytes_local += built.bytes_local;
        self.report.bytes_fetched += built.bytes_fetched;
        self.report.bytes_resumed += built.bytes_resumed;
        self.pending_chunks = built.chunks;
        self.place(action, temp)
    }

    /// Renames the finished `temp` to the action's path, keeping what was there
    /// in the trash, and records the version.
    fn place(&mut self, action: &Action, temp: &Path) -> Result<bool> {
        let rel = action.path();
        let abs = self.root.join(rel);
        // Where nothing is expected, the rename itself refuses to replace
        // whatever appeared meanwhile: no need to look first.
        let expects_nothing = action
            .current
            .as_ref()
            .is_none_or(|c| c.kind == Kind::Deleted);
        let placed = self
            .prepare_parent(rel)
            .and_then(|()| match expects_nothing {
                true => Ok(true),
                false => disk_matches(&abs, action.current.as_ref()),
            })
            .and_then(|matches| match matches {
                true => self.replace_with(action, temp),
                false => Ok(false),
            });
        if !matches!(placed, Ok(true)) {
            let _ = fs::remove_file(temp);
            return placed;
        }
        self.record(&action.target, &abs)?;
        Ok(true)
    }

    /// Renames `from` over the action's path (whose state was just checked).
    fn replace_with(&mut self, action: &Action, from: &Path) -> Result<bool> {
        let rel = action.path();
        let abs = self.root.join(rel);
        match action.current.as_ref().map(|c| c.kind) {
            None | Some(Kind::Deleted) => rename_no_replace(from, &abs),
            Some(Kind::Dir) => match self.remove_dir(&abs) {
                Ok(()) => rename_no_replace(from, &abs),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    if let Some(current) = &action.current {
                        self.keep_dir(current, &abs)?;
                    }
                    Ok(false)
                }
                Err(e) => Err(Error::io(&abs, e)),
            },
            Some(Kind::File | Kind::Symlink) => {
                self.trash.keep(&self.root, rel)?;
                fs::rename(from, &abs).map_err(|e| Error::io(&abs, e))?;
                Ok(true)
            }
        }
    }

    fn set_meta(&self, abs: &Path, target: &Entry) -> Result<()> {
        match target.kind {
            Kind::File => {
                set_mode(abs, target.mode)?;
                set_mtime(abs, target.mtime_ns)
            }
            Kind::Symlink => set_mtime(abs, target.mtime_ns),
            Kind::Dir => set_mode(abs, target.mode),
            Kind::Deleted => Ok(()),
        }
    }

    /// Records that `abs` now holds `version` (authored elsewhere; recorded here).
    fn record(&mut self, version: &Entry, abs: &Path) -> Result<()> {
        let now = now_ns();
        let mut entry = Entry {
            seq: 0,
            peerid: self.replica,
            utime_ns: now,
            inode: 0,
            ctime_ns: 0,
            ..version.clone()
        };
        if version.kind != Kind::Deleted {
            let meta = fs::symlink_metadata(abs).map_err(|e| Error::io(abs, e))?;
            entry.inode = meta.ino();
            if now - mtime_of(&meta) >= RACY_WINDOW_NS {
                entry.ctime_ns = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
            }
        }
        let chunks = match version.kind {
            Kind::File => std::mem::take(&mut self.pending_chunks),
            _ => Vec::new(),
        };
        self.records.push(Record::Append { entry, chunks });
        Ok(())
    }

    /// Removes an empty directory; those known ready may have been under it.
    fn remove_dir(&mut self, abs: &Path) -> std::io::Result<()> {
        self.ready_dirs.clear();
        fs::remove_dir(abs)
    }

    /// [`prepare_parent`], once per directory and run: most files of a sync share
    /// their parents. Forgotten whenever this run removes a directory.
    fn prepare_parent(&mut self, rel: &str) -> Result<()> {
        let parent = rel.rfind('/').map_or("", |i| &rel[..i]);
        if !self.ready_dirs.contains(parent) {
            prepare_parent(&self.root, rel)?;
            self.ready_dirs.insert(parent.to_string());
        }
        Ok(())
    }

    /// A temp file beside `rel` (its parent is made ready first). In the target's
    /// own directory, as rsync does: ext4 allocates the inode near its directory,
    /// where a single temp directory makes every new file search the same inode
    /// group (most of a first sync's time went there). The scan removes leftovers.
    fn temp_path(&mut self, rel: &str) -> Result<PathBuf> {
        self.prepare_parent(rel)?;
        self.tmp_counter += 1;
        let name = format!("{}{}", self.temp_prefix, self.tmp_counter);
        Ok(match rel.rfind('/') {
            Some(i) => self.root.join(&rel[..i]).join(name),
            None => self.root.join(name),
        })
    }
}

/// Copies `input` to its end into `output`; returns the bytes copied and their
/// content hash.
pub(crate) fn copy_hashing(
    input: &mut File,
    from: &Path,
    output: &mut File,
    to: &Path,
) -> Result<(u64, Hash)> {
    let mut tee = Tee {
        input,
        output,
        write_error: None,
    };
    match ContentHasher::default().hash_reader(&mut tee, |_| {}) {
        Ok(hashed) => Ok((hashed.size, hashed.hash)),
        Err(e) => Err(match tee.write_error.take() {
            Some(write_error) => Error::io(to, write_error),
            None => Error::io(from, e),
        }),
    }
}

/// Writes to `output` what is read from `input`; a failed write fails the read
/// and is kept in `write_error`, to be told apart from a failed read.
struct Tee<'a> {
    input: &'a mut File,
    output: &'a mut File,
    write_error: Option<std::io::Error>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        if let Err(e) = self.output.write_all(&buf[..n]) {
            self.write_error = Some(e);
            return Err(std::io::Error::other("the copy could not be written"));
        }
        Ok(n)
    }
}

/// Sets the finished temp file's mode (unless it was created `created_with`
/// and the umask left it that) and mtime, after the last write.
fn finish_file(file: File, temp: &Path, target: &Entry, created_with: u32) -> Result<()> {
    let mode = file_mode(target);
    if umask().is_none_or(|umask| created_with & !umask != mode) {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(temp, e))?;
    }
    let times = mtime_only(target.mtime_ns);
    // SAFETY: an open descriptor and a two-element timespec array.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(Error::io(temp, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The permission bits a file gets: only those travel, never setuid and the like.
fn file_mode(target: &Entry) -> u32 {
    target.mode & 0o777
}

/// This process's umask, read once (Latus never changes it); `None` where
/// `/proc` does not say.
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// Whether `abs` still is what the history says (`None`: nothing).
fn disk_matches(abs: &Path, expected: Option<&Entry>) -> Result<bool> {
    let expected = expected.filter(|e| e.kind != Kind::Deleted);
    let meta = match fs::symlink_metadata(abs) {
        Ok(meta) => meta,
        Err(e) if is_gone(&e) => return Ok(expected.is_none()),
        Err(e) => return Err(Error::io(abs, e)),
    };
    let Some(expected) = expected else {
        return Ok(false);
    };
    Ok(match expected.kind {
        Kind::File => {
            meta.is_file()
                && meta.size() == expected.size
                && mtime_of(&meta) == expected.mtime_ns
                && meta.mode() & 0o7777 == expected.mode
                && (expected.inode == 0 || meta.ino() == expected.inode)
                && (expected.ctime_ns == 0
                    || meta.ctime() * 1_000_000_000 + meta.ctime_nsec() == expected.ctime_ns)
        }
        Kind::Dir => meta.is_dir(),
        Kind::Symlink => {
            meta.is_symlink()
                && fs::read_link(abs)
                    .ok()
                    .is_some_and(|t| t.to_str() == expected.link_target.as_deref())
        }
        Kind::Deleted => false,
    })
}

/// Makes sure every parent of `rel` is a real directory inside `root` (creating
/// missing ones), never a symlink: nothing is written through a symlinked parent.
pub(crate) fn prepare_parent(root: &Path, rel: &str) -> Result<()> {
    let mut dir = root.to_path_buf();
    let mut components: Vec<&str> = rel.split('/').collect();
    components.pop();
    for component in components {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::UnsafePath {
                    path: rel.to_string(),
                    reason: "a parent is a symlink or not a directory",
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&dir, e)),
            },
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::UnsafePath {
        path: path.display().to_string(),
        reason: "contains NUL",
    })
}

/// Renames `from` to `to` unless something is at `to`; `false` if something is.
pub(crate) fn rename_no_replace(from: &Path, to: &Path) -> Result<bool> {
    let (c_from, c_to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // File systems without RENAME_NOREPLACE: check, then rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Ok(false);
            }
            fs::rename(from, to).map_err(|e| Error::io(to, e))?;
            Ok(true)
        }
        _ => Err(Error::io(to, e)),
    }
}

fn set_mode(abs: &Path, mode: u32) -> Result<()> {
    // Only permission bits travel: a peer cannot make a file setuid here.
    fs::set_permissions(abs, fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| Error::io(abs, e))
}

/// Sets the mtime of `path` itself (a symlink's own, not its target's).
pub(crate) fn set_mtime(path: &Path, mtime_ns: i64) -> Result<()> {
    let c = c_path(path)?;
    let times = mtime_only(mtime_ns);
    // SAFETY: a valid NUL-terminated path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The times for `utimensat`/`futimens` that set the mtime and leave the atime.
fn mtime_only(mtime_ns: i64) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        },
    ]
}

pub(crate) fn mtime_of(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// Removes the file at `path`; `false` if there was none.
pub(crate) fn remove_if_present(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

pub(crate) fn clear_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: PeerId = PeerId([9; 32]);

    #[test]
    fn vectored_writes_land_each_part_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.write_all_at(b"0123456789", 0).unwrap();
        let parts: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| vec![b'a' + (i % 26) as u8; 3])
            .collect();
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        // More slices than one call takes: the rest follow in further calls.
        write_all_vectored_at(&file, &parts, 4).unwrap();
        let mut expected = b"0123".to_vec();
        expected.extend(parts.concat());
        assert_eq!(fs::read(&path).unwrap(), expected);
    }

    /// A resumed build learns what it holds from the partial file's length:
    /// reserving blocks must not change it.
    #[test]
    fn blocks_are_reserved_for_a_big_file_without_changing_its_length() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| File::create_new(dir.path().join(name)).unwrap();
        let (big, small) = (file("big"), file("small"));
        reserve_blocks(&big, 4 << 20).unwrap();
        reserve_blocks(&small, RESERVE_FROM - 1).unwrap();
        let (big, small) = (big.metadata().unwrap(), small.metadata().unwrap());
        assert_eq!((big.len(), small.len()), (0, 0));
        // st_blocks counts 512-byte units.
        assert!(big.blocks() * 512 >= 4 << 20, "{} blocks", big.blocks());
        assert_eq!(small.blocks(), 0);
    }

    /// A reservation the disk cannot hold fails, and gives back what it took:
    /// the rest of the daemon (its history first) still has the free space.
    /// Needs a small file system: `LATUS_TEST_SMALL_DISK_DIR` (CI mounts one).
    #[test]
    fn a_reservation_the_disk_cannot_hold_fails_and_keeps_no_blocks() {
        let Some(dir) = std::env::var_os("LATUS_TEST_SMALL_DISK_DIR") else {
            eprintln!("LATUS_TEST_SMALL_DISK_DIR is not set: not tested");
            return;
        };
        let dir = tempfile::tempdir_in(dir).unwrap();
        let before = free_bytes(dir.path());
        assert!(before > 1 << 20, "the test file system is full already");
        let file = File::create_new(dir.path().join("big")).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        let err = reserve_blocks(&file, before * 2).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert_eq!(file.metadata().unwrap().len(), 4);
        let after = free_bytes(dir.path());
        assert!(
            after >= before - (64 << 10),
            "{after} of {before} bytes free after"
        );
    }

    /// Bytes free for an unprivileged user on the file system of `path`.
    fn free_bytes(path: &Path) -> u64 {
        let path = c_path(path).unwrap();
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a valid C string and `stat` is written by the call.
        assert_eq!(
            unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) },
            0
        );
        // SAFETY: statvfs succeeded, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        stat.f_bavail * stat.f_frsize
    }

    /// A version of `path` the peer authored at `utime_ns` and recorded as `seq`.
    fn theirs(path: &str, content: Option<&[u8]>, seq: u64, utime_ns: i64) -> Entry {
        let kind = match content {
            Some(_) => Kind::File,
            None => Kind::Deleted,
        };
        Entry {
            seq,
            size: content.map_or(0, |c| c.len() as u64),
            mtime_ns: 1_700_000_000_000_000_000,
            mode: 0o644,
            hash: content.map(Hash::of),
            ..Entry::authored(path.to_string(), kind, PEER, utime_ns)
        }
    }

    /// A partial file of `content`, with some of its bytes in it, recorded in
    /// the chunk store.
    fn partial(folder: &Folder, content: &[u8]) -> PathBuf {
        let dir = folder.marker_dir().join(PARTIAL_DIR);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(Hash::of(content).to_hex());
        fs::write(&path, &content[..content.len() / 2]).unwrap();
        let chunk_store = ChunkStore::open(&folder.marker_dir()).unwrap();
        chunk_store
            .record(&Hash::of(content), &[0], &[], 1)
            .unwrap();
        path
    }

    /// Whether the chunk store records chunks of `content`.
    fn recorded(folder: &Folder, content: &[u8]) -> bool {
        let chunk_store = ChunkStore::open(&folder.marker_dir()).unwrap();
        !chunk_store.complete(&Hash::of(content)).unwrap().is_empty()
    }

    #[test]
    fn partials_no_plan_builds_and_old_ones_are_removed_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open_or_create(dir.path()).unwrap();
        let mut store = HistoryStore::open(&folder.history_path()).unwrap();
        // The peer has a.txt and b.txt, not here yet: their builds are pending.
        let received = [
            theirs("a.txt", Some(b"a, first version"), 1, 10),
            theirs("b.txt", Some(b"b's content"), 2, 10),
        ];
        store.store_remote(&PEER, &received, 2, None).unwrap();
        let a_first = partial(&folder, b"a, first version");
        let b_old = partial(&folder, b"b's content");
        set_mtime(&b_old, now_ns() - 8 * 24 * 3600 * 1_000_000_000).unwrap();
        let unknown = partial(&folder, b"no path has this content");
        let junk = folder.marker_dir().join(PARTIAL_DIR).join("not-a-hash");
        fs::write(&junk, b"?").unwrap();

        let removed = clean_partials(&folder, &store, PARTIAL_MAX_AGE).unwrap();
        assert_eq!(removed, 3);
        assert!(a_first.exists(), "a pending build's partial was removed");
        assert!(!b_old.exists(), "a partial older than the limit was kept");
        assert!(!unknown.exists() && !junk.exists());
        // The chunks recorded for them go with them.
        assert!(recorded(&folder, b"a, first version"));
        assert!(!recorded(&folder, b"b's content"));
        assert!(!recorded(&folder, b"no path has this content"));

        // The peer wrote a.txt again before the build finished: the first version
        // is no longer wanted, the new one is.
        let received = [theirs("a.txt", Some(b"a, second version"), 3, 20)];
        store.store_remote(&PEER, &received, 3, None).unwrap();
        let a_second = partial(&folder, b"a, second version");
        assert_eq!(clean_partials(&folder, &store, PARTIAL_MAX_AGE).unwrap(), 1);
        assert!(!a_first.exists() && a_second.exists());

        // Then deleted it.
        store
            .store_remote(&PEER, &[theirs("a.txt", None, 4, 30)], 4, None)
            .unwrap();
        assert_eq!(clean_partials(&folder, &store, PARTIAL_MAX_AGE).unwrap(), 1);
        assert!(!a_second.exists());
        assert_eq!(clean_partials(&folder, &store, PARTIAL_MAX_AGE).unwrap(), 0);
    }

    #[test]
    fn no_partial_directory_is_nothing_to_clean() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open_or_create(dir.path()).unwrap();
        let store = HistoryStore::open(&folder.history_path()).unwrap();
        assert_eq!(clean_partials(&folder, &store, PARTIAL_MAX_AGE).unwrap(), 0);
    }
}
