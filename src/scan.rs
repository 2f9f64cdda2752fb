//! The scanner: walks a folder, stats every entry, hashes only what changed since
//! its latest history entry, and records new versions and deletions.
//!
//! Threads: the caller walks and stats; `hash_threads` workers read and hash; one
//! writer owns the database (single-writer rule) and commits at most `batch_size`
//! entries per transaction, so readers see a long first scan progress.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use ignore::WalkBuilder;
use serde::Serialize;

use crate::content::{ContentHasher, Hash, HashedContent};
use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::folder::{Folder, IGNORE_FILE, MARKER_DIR, TEMP_PREFIX};
use crate::history::{EntriesByPath, Entry, HistoryStore, Kind, Record};
use crate::now_ns;
use crate::throttle::Throttle;

/// A file is read at most this many times while it keeps changing under the reader.
const HASH_ATTEMPTS: usize = 3;

/// A file modified this shortly before it was hashed could be modified again within
/// the same timestamp tick, leaving size, mtime and ctime as they were (git's "racy
/// clean" problem; FAT's mtime tick is 2 s). Such a file is recorded with
/// [`UNVERIFIED_CTIME`], so the next scan reads it again instead of trusting its stat.
pub(crate) const RACY_WINDOW_NS: i64 = 2_000_000_000;
const UNVERIFIED_CTIME: i64 = 0;

/// Hooks into a running scan, called from its threads.
pub trait ScanObserver: Send + Sync {
    /// `bytes` of `path` were just read for hashing.
    fn bytes_read(&self, _path: &str, _bytes: u64) {}
    /// The walk reached one more entry.
    fn entry_walked(&self) {}
    /// A batch of `entries` records was committed; the history now ends at
    /// `last_seq` (peers may read it while the scan goes on).
    fn batch_committed(&self, _entries: usize, _last_seq: u64) {}
}

#[derive(Clone)]
pub struct ScanOptions {
    /// Bytes per second read for hashing, over all threads; 0 = unlimited.
    pub max_read_bytes_per_sec: f64,
    pub hash_threads: usize,
    /// Records per transaction.
    pub batch_size: usize,
    pub observer: Option<Arc<dyn ScanObserver>>,
    /// Scan only these paths and what is under them (those a watcher named);
    /// `None`: the whole folder.
    pub only: Option<Vec<String>>,
    /// Hash big files (8 MiB and more) at a lower CPU priority
    /// ([`BACKGROUND_NICE`]): a daemon's scan then leaves the cores to serving
    /// those already hashed first. Small files are hashed at the usual
    /// priority: their scan is mostly waiting on the disk, and peers wait on it.
    pub background: bool,
    /// Set from another thread, it stops the scan, which then ends with
    /// [`Error::ScanAborted`]. What it recorded is true of the disk, but not
    /// the whole folder: it records no deletion, having not walked it all.
    pub stop: Option<Arc<AtomicBool>>,
}

/// The nice value at which a background scan hashes big files.
pub const BACKGROUND_NICE: i32 = 10;

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            max_read_bytes_per_sec: 0.0,
            // Reads in flight, more than cores: a cold scan of small files waits
            // on the disk, not the CPU (20k files on 2 cores: 1.5 s with 2
            // threads, 0.7 s with 8).
            hash_threads: std::thread::available_parallelism().map_or(8, |n| (n.get() * 2).max(8)),
            batch_size: 1000,
            observer: None,
            only: None,
            background: false,
            stop: None,
        }
    }
}

/// The part of a folder a targeted scan looks at: some paths and what is under them.
struct PathScope {
    targets: HashSet<String>,
    /// Every directory above a target: walked through, not scanned.
    ancestors: HashSet<String>,
}

impl PathScope {
    fn new(paths: &[String]) -> Self {
        let targets: HashSet<String> = paths.iter().cloned().collect();
        let ancestors = targets
            .iter()
            .flat_map(|path| {
                path.match_indices('/')
                    .map(|(end, _)| path[..end].to_string())
            })
            .collect();
        PathScope { targets, ancestors }
    }

    /// Whether `rel` is a target or under one.
    fn contains(&self, rel: &str) -> bool {
        self.targets.contains(rel)
            || rel
                .match_indices('/')
                .any(|(end, _)| self.targets.contains(&rel[..end]))
    }

    /// Whether the walk goes through or into `rel`.
    fn walks(&self, rel: &str) -> bool {
        self.ancestors.contains(rel) || self.contains(rel)
    }
}

/// What a scan found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanSummary {
    pub root: PathBuf,
    /// Entries present on disk (not counting ignored ones).
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub new: u64,
    pub changed: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    /// Paths left as they were in the history, each with a warning.
    pub skipped: u64,
    pub warnings: Vec<String>,
    pub seconds: f64,
    /// The history's last sequence number after the scan.
    pub last_seq: u64,
}

/// The stat fields that decide whether a file must be hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    mode: u32,
}

impl Stat {
    pub(crate) fn of(meta: &Metadata) -> Self {
        Stat {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            inode: meta.ino(),
            mode: meta.mode() & 0o7777,
        }
    }

    /// Whether the file is still as `entry` recorded it when it was hashed. An
    /// entry recorded racily (ctime 0) never matches.
    pub(crate) fn matches(&self, entry: &Entry) -> bool {
        entry.kind == Kind::File
            && entry.size == self.size
            && entry.mtime_ns == self.mtime_ns
            && entry.ctime_ns == self.ctime_ns
            && entry.inode == self.inode
            && entry.mode == self.mode
    }
}

#[derive(Clone, Copy)]
enum Change {
    New,
    Changed,
    Deleted,
    /// Re-hashed, same version: only the change-detection fields move.
    Refreshed,
}

impl Change {
    /// A new version of a path whose previous version is `previous`.
    fn replacing(previous: Option<&Entry>) -> Self {
        match previous {
            Some(_) => Change::Changed,
            None => Change::New,
        }
    }
}

struct HashJob {
    rel: String,
    abs: PathBuf,
    stat: Stat,
    previous: Option<Entry>,
}

/// What changed, from one of the scan's threads to the history writer.
type Changes = Vec<(Change, Record)>;

/// Files handed to a hashing thread at once (and deletions sent to the history
/// writer at once). One file at a time, the walk of a cold scan (faster than
/// the hashing) met a full queue at nearly every file and the history writer an
/// empty one at nearly every change: each meeting spun and yielded before
/// parking.
const HASH_BATCH: usize = 16;
/// Bytes of files after which a batch is handed out even if not full.
const HASH_BATCH_BYTES: u64 = 1 << 20;
/// How long a hashing thread keeps what it hashed before it ends its batch.
const HASHED_MAX_WAIT: Duration = Duration::from_millis(50);

/// The files to hash that the walk has not handed out yet.
struct HashJobs<'a> {
    sender: &'a Sender<Vec<HashJob>>,
    jobs: Vec<HashJob>,
    bytes: u64,
}

impl HashJobs<'_> {
    /// Adds `job`, handing the batch out once full; `false` when the scan stopped.
    fn push(&mut self, job: HashJob) -> bool {
        self.bytes += job.stat.size;
        self.jobs.push(job);
        (self.jobs.len() < HASH_BATCH && self.bytes < HASH_BATCH_BYTES) || self.send()
    }

    fn send(&mut self) -> bool {
        self.bytes = 0;
        let batch = std::mem::replace(&mut self.jobs, Vec::with_capacity(HASH_BATCH));
        batch.is_empty() || self.sender.send(batch).is_ok()
    }
}

/// Warnings go to the log as they happen and to the summary at the end.
#[derive(Default)]
struct Warnings(Mutex<Vec<String>>);

impl Warnings {
    fn add(&self, path: &str, reason: impl std::fmt::Display) {
        tracing::warn!("{path}: {reason}");
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{path}: {reason}"));
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Default)]
struct Counters {
    files_hashed: AtomicU64,
    bytes_hashed: AtomicU64,
    skipped: AtomicU64,
}

/// Everything the scan's threads share.
struct Shared<'a> {
    root: &'a Path,
    device: PeerId,
    throttle: Option<Throttle>,
    observer: Option<Arc<dyn ScanObserver>>,
    warnings: Arc<Warnings>,
    counters: Counters,
    big_files: BigFiles,
    stop: Option<Arc<AtomicBool>>,
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        is_set(self.stop.as_deref())
    }
}

/// Files of at least this size are hashed at most one per core at a time.
const BIG_FILE: u64 = 8 << 20;

/// Hashing a big file is CPU-bound: more of them at once than cores only
/// interleaves them, so that all finish at the end. One per core finishes them
/// in turn, and a first scan can show each to peers as soon as it is hashed.
struct BigFiles {
    hashing: Mutex<usize>,
    done: std::sync::Condvar,
    at_once: usize,
    /// Hashed at nice [`BACKGROUND_NICE`] (see [`ScanOptions::background`]).
    background: bool,
}

impl BigFiles {
    fn new(background: bool) -> Self {
        BigFiles {
            hashing: Mutex::new(0),
            done: std::sync::Condvar::new(),
            at_once: std::thread::available_parallelism().map_or(2, |n| n.get()),
            background,
        }
    }

    /// Runs `hash` for a file of `size` bytes, in turn if it is big.
    fn hash<T: Send>(&self, size: u64, hash: impl FnOnce() -> T + Send) -> T {
        if size < BIG_FILE {
            return hash();
        }
        let lock = || self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        let mut hashing = lock();
        while *hashing >= self.at_once {
            hashing = self.done.wait(hashing).unwrap_or_else(|p| p.into_inner());
        }
        *hashing += 1;
        drop(hashing);
        // On a thread of its own: a thread cannot take its priority back.
        let hashed = if self.background {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        lower_priority();
                        hash()
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        } else {
            hash()
        };
        *lock() -= 1;
        self.done.notify_one();
        hashed
    }
}

impl Shared<'_> {
    fn skip(&self, path: &str, reason: impl std::fmt::Display) {
        self.counters.skipped.fetch_add(1, Ordering::Relaxed);
        self.warnings.add(path, reason);
    }

    /// An entry for what a stat observed; the caller adds the content.
    fn observed_entry(&self, path: String, kind: Kind, stat: &Stat, now_ns: i64) -> Entry {
        Entry {
            mtime_ns: stat.mtime_ns,
            mode: stat.mode,
            inode: stat.inode,
            ctime_ns: stat.ctime_ns,
            ..self.new_entry(path, kind, now_ns)
        }
    }

    fn new_entry(&self, path: String, kind: Kind, now_ns: i64) -> Entry {
        Entry::authored(path, kind, self.device, now_ns)
    }
}

/// Scans `folder` into `store`, recording versions as authored by `device`.
pub fn scan(
    folder: &Folder,
    store: &mut HistoryStore,
    device: PeerId,
    options: &ScanOptions,
) -> Result<ScanSummary> {
    let started = Instant::now();
    let shared = Shared {
        root: folder.root(),
        device,
        throttle: Throttle::new(options.max_read_bytes_per_sec),
        observer: options.observer.clone(),
        warnings: Arc::default(),
        counters: Counters::default(),
        big_files: BigFiles::new(options.background),
        stop: options.stop.clone(),
    };
    let threads = options.hash_threads.max(1);
    let batch_size = options.batch_size.max(1);
    let mut summary = ScanSummary {
        root: folder.root().to_path_buf(),
        ..ScanSummary::default()
    };

    let (job_tx, job_rx) = bounded::<Vec<HashJob>>(threads * 64 / HASH_BATCH);
    let (change_tx, change_rx) = bounded::<Changes>(batch_size);
    let history_path = store.path().to_path_buf();
    let path_scope = options.only.as_deref().map(|p| Arc::new(PathScope::new(p)));
    let written = std::thread::scope(|scope| {
        let in_scope = path_scope.clone();
        let looked_up = options
            .only
            .as_deref()
            .filter(|paths| paths.len() <= TARGETS_LOOKED_UP);
        let known = scope.spawn(move || {
            let mut current = load_current(&history_path, looked_up)?;
            if let (None, Some(path_scope)) = (looked_up, in_scope) {
                current.retain(|path, _| path_scope.contains(path));
            }
            Ok(current)
        });
        let writer = scope.spawn(|| write_changes(store, change_rx, batch_size, &shared));
        for _ in 0..threads {
            let (jobs, changes) = (job_rx.clone(), change_tx.clone());
            let shared = &shared;
            scope.spawn(move || hash_worker(jobs, changes, shared));
        }
        drop(job_rx);
        let walked = walk(
            &shared,
            path_scope.clone(),
            known,
            threads,
            &job_tx,
            &change_tx,
            &mut summary,
        );
        drop(job_tx);
        if let Ok(unseen) = &walked {
            record_deletions(&shared, unseen, &change_tx);
        }
        drop(change_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::ScanAborted("the history writer panicked".into())));
        // A write failure stops the walk; report the write failure, the cause.
        written.and_then(|counts| walked.map(|_| counts))
    })?;
    // Files left unhashed once stopped went unrecorded: the scan is not whole.
    if shared.stopped() {
        return Err(scan_stopped());
    }

    summary.new = written.new;
    summary.changed = written.changed;
    summary.deleted = written.deleted;
    summary.unchanged += written.refreshed;
    summary.files_hashed = shared.counters.files_hashed.load(Ordering::Relaxed);
    summary.bytes_hashed = shared.counters.bytes_hashed.load(Ordering::Relaxed);
    summary.skipped = shared.counters.skipped.load(Ordering::Relaxed);
    summary.warnings = shared.warnings.take();
    summary.last_seq = store.last_seq()?;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::debug!(
        "{}: scanned in {:?}",
        folder.root().display(),
        started.elapsed()
    );
    Ok(summary)
}

/// The current (not deleted) entry of every path, or of `paths` and what is under
/// them, through a connection of its own so it can run beside the walk.
fn load_current(history: &Path, paths: Option<&[String]>) -> Result<EntriesByPath> {
    let started = Instant::now();
    let store = HistoryStore::open_read_only(history)?;
    let current = match paths {
        Some(paths) => store.latest_existing_under(paths)?,
        None => store.latest_existing_by_path()?,
    };
    tracing::debug!(
        "loaded {} current entries in {:?}",
        current.len(),
        started.elapsed()
    );
    Ok(current)
}

/// Targets of a scan up to which their entries are looked up one by one; beyond,
/// one pass over the whole history is quicker.
const TARGETS_LOOKED_UP: usize = 2_000;

/// `/`-separated path relative to the root; `None` if not valid UTF-8.
pub(crate) fn relative(root: &Path, path: &Path) -> Option<String> {
    // A walk joins names onto the root: most of its paths are the root's bytes,
    // '/', then clean components, and need not be parsed (parsing them was 8% of
    // a rescan's own CPU).
    let rest = path
        .as_os_str()
        .as_encoded_bytes()
        .strip_prefix(root.as_os_str().as_encoded_bytes())
        .and_then(|rest| rest.strip_prefix(b"/"));
    if let Some(rest) = rest
        && rest
            .split(|&byte| byte == b'/')
            .all(|part| !matches!(part, b"" | b"." | b".."))
    {
        return std::str::from_utf8(rest).ok().map(str::to_owned);
    }
    let rel = path.strip_prefix(root).ok()?;
    let mut out = String::new();
    for part in rel.components() {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(part.as_os_str().to_str()?);
    }
    Some(out)
}

/// A walk of a folder's tree as every part of Latus sees it: `.latus/` left out,
/// `.latusignore` rules honoured, symlinks not followed, and names that are not
/// UTF-8 refused (reported through `on_bad_name`) rather than mangled: a lossy
/// name would be a different file on peers.
pub(crate) fn folder_walker(
    root: &Path,
    on_bad_name: impl Fn(&str) + Send + Sync + 'static,
) -> ignore::Walk {
    folder_walk(root, None, on_bad_name).build()
}

/// The walk [`folder_walker`] runs, to build in turn or in parallel; with a
/// `path_scope`, only through the directories that lead to its paths.
fn folder_walk(
    root: &Path,
    path_scope: Option<Arc<PathScope>>,
    on_bad_name: impl Fn(&str) + Send + Sync + 'static,
) -> WalkBuilder {
    let shown_root = root.to_path_buf();
    let mut walk = WalkBuilder::new(root);
    walk.standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(move |entry| {
            if entry.file_name() == MARKER_DIR {
                return false;
            }
            if entry.file_type().is_some_and(|t| t.is_file())
                && entry
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
            {
                // Every walk runs under the folder lock: no merge is building it.
                let _ = fs::remove_file(entry.path());
                return false;
            }
            if let Some(path_scope) = &path_scope
                && entry.depth() > 0
                && !relative(&shown_root, entry.path()).is_some_and(|rel| path_scope.walks(&rel))
            {
                return false;
            }
            if entry.depth() > 0 && entry.file_name().to_str().is_none() {
                let shown = entry
                    .path()
                    .strip_prefix(&shown_root)
                    .unwrap_or(entry.path());
                on_bad_name(&shown.to_string_lossy());
                return false;
            }
            true
        });
    walk
}

/// One entry found by the walk, stat'ed.
struct Walked {
    rel: String,
    path: PathBuf,
    meta: Metadata,
}

/// What a walking thread found.
enum Found {
    Entry(Walked),
    Skipped { path: String, reason: String },
}

/// Entries a walking thread sends at once. One at a time, the walking threads
/// of a cold scan (faster than the hashing) met a full channel at nearly every
/// entry, and each meeting spun and yielded before parking: about a tenth of
/// the scan's CPU on 20k files.
const FOUND_BATCH: usize = 64;

/// What one walking thread found and has not sent yet; the rest is sent when
/// the thread ends.
struct FoundBatch {
    sender: Sender<Vec<Found>>,
    found: Vec<Found>,
}

impl FoundBatch {
    /// Adds `found`, sending the batch once full, or at once with a directory:
    /// it is visited before anything under it is found, so it then reaches the
    /// history first. Held back, it could come after its files: peers applying
    /// a first scan batch by batch would make it themselves, with their own
    /// mode. `false` when the scan stopped.
    fn push(&mut self, found: Found) -> bool {
        let is_dir = matches!(&found, Found::Entry(walked) if walked.meta.is_dir());
        self.found.push(found);
        (self.found.len() < FOUND_BATCH && !is_dir) || self.send()
    }

    fn send(&mut self) -> bool {
        let full = std::mem::replace(&mut self.found, Vec::with_capacity(FOUND_BATCH));
        self.sender.send(full).is_ok()
    }
}

impl Drop for FoundBatch {
    fn drop(&mut self) {
        if !self.found.is_empty() {
            self.send();
        }
    }
}

/// Walks the folder and sends what changed. Directories are read and entries
/// stat'ed by `walk_threads` threads at once: on a cold cache each waits on the
/// disk, and with several reads in flight a walk of 20k files takes half the
/// time. Entries arrive in no particular order; each is compared on its own.
/// The history's current entries load on another thread meanwhile (`known`);
/// entries walked before they arrive wait in a queue, so the walk and the load
/// overlap.
fn walk(
    shared: &Shared<'_>,
    path_scope: Option<Arc<PathScope>>,
    known: ScopedJoinHandle<'_, Result<EntriesByPath>>,
    walk_threads: usize,
    jobs: &Sender<Vec<HashJob>>,
    changes: &Sender<Changes>,
    summary: &mut ScanSummary,
) -> Result<EntriesByPath> {
    let mut jobs = HashJobs {
        sender: jobs,
        jobs: Vec::with_capacity(HASH_BATCH),
        bytes: 0,
    };
    let warnings = Arc::clone(&shared.warnings);
    let mut walker = folder_walk(shared.root, path_scope.clone(), move |shown| {
        warnings.add(
            shown,
            "name is not valid UTF-8; not recorded (rename it to sync it)",
        );
    });
    walker.threads(walk_threads);
    let (found_tx, found_rx) = bounded::<Vec<Found>>(1024 / FOUND_BATCH);
    let root = shared.root;

    let join_known = |known: ScopedJoinHandle<'_, Result<EntriesByPath>>| {
        known
            .join()
            .unwrap_or_else(|_| Err(Error::ScanAborted("loading the history panicked".into())))
    };
    let mut known = Some(known);
    let mut previous = None;
    let mut queued = Vec::new();
    let now = now_ns();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            walker.build_parallel().run(|| {
                let mut batch = FoundBatch {
                    sender: found_tx.clone(),
                    found: Vec::with_capacity(FOUND_BATCH),
                };
                Box::new(move |item| {
                    let sent = visit(root, item).map(|found| batch.push(found));
                    match sent {
                        // The scan stopped: stop walking.
                        Some(false) => ignore::WalkState::Quit,
                        _ => ignore::WalkState::Continue,
                    }
                })
            })
        });
        for found in found_rx.into_iter().flatten() {
            // Returning drops the receiver: the walking threads then stop too.
            if shared.stopped() {
                return Err(scan_stopped());
            }
            let walked = match found {
                Found::Entry(walked) => walked,
                Found::Skipped { path, reason } => {
                    shared.skip(&path, reason);
                    continue;
                }
            };
            // The directories above the paths scanned are only walked through.
            if path_scope
                .as_ref()
                .is_some_and(|p| !p.contains(&walked.rel))
            {
                continue;
            }
            if let Some(observer) = &shared.observer {
                observer.entry_walked();
            }
            if known.as_ref().is_some_and(|k| k.is_finished())
                && let Some(handle) = known.take()
            {
                let mut loaded = join_known(handle)?;
                for walked in queued.drain(..) {
                    record_walked(
                        shared,
                        walked,
                        &mut loaded,
                        now,
                        &mut jobs,
                        changes,
                        summary,
                    )?;
                }
                previous = Some(loaded);
            }
            match previous.as_mut() {
                Some(previous) => {
                    record_walked(shared, walked, previous, now, &mut jobs, changes, summary)?
                }
                None => queued.push(walked),
            }
        }
        Ok::<(), Error>(())
    })?;
    let mut previous = match (previous, known) {
        (Some(previous), _) => previous,
        (None, Some(handle)) => join_known(handle)?,
        (None, None) => EntriesByPath::default(),
    };
    for walked in queued {
        record_walked(
            shared,
            walked,
            &mut previous,
            now,
            &mut jobs,
            changes,
            summary,
        )?;
    }
    if !jobs.send() {
        return Err(writer_stopped());
    }
    Ok(previous)
}

/// One item of the walk, stat'ed (on the walking thread); `None` for the root.
fn visit(root: &Path, item: std::result::Result<ignore::DirEntry, ignore::Error>) -> Option<Found> {
    let dirent = match item {
        Ok(dirent) => dirent,
        Err(err) => {
            // An unreadable directory: what it held stays in the history as it was
            // (deletion needs proof of absence, see `record_deletions`).
            let (path, reason) = describe_walk_error(root, &err);
            return Some(Found::Skipped { path, reason });
        }
    };
    if dirent.depth() == 0 {
        return None;
    }
    let rel = relative(root, dirent.path())?; // names that are not UTF-8: filtered above
    Some(match fs::symlink_metadata(dirent.path()) {
        Ok(meta) => Found::Entry(Walked {
            rel,
            path: dirent.into_path(),
            meta,
        }),
        Err(e) => Found::Skipped {
            path: rel,
            reason: format!("cannot stat: {e}"),
        },
    })
}

/// Compares one walked entry with its previous version (taken out of `previous`,
/// which ends up holding only what the walk did not see) and sends what changed.
fn record_walked(
    shared: &Shared<'_>,
    walked: Walked,
    previous: &mut EntriesByPath,
    now: i64,
    jobs: &mut HashJobs<'_>,
    changes: &Sender<Changes>,
    summary: &mut ScanSummary,
) -> Result<()> {
    let Walked { rel, path, meta } = walked;
    let prev = previous.remove(&rel);
    let stat = Stat::of(&meta);
    let file_type = meta.file_type();
    let entry = if file_type.is_file() {
        summary.files += 1;
        if prev.as_ref().is_some_and(|p| stat.matches(p)) {
            summary.unchanged += 1;
            return Ok(());
        }
        let job = HashJob {
            rel,
            abs: path,
            stat,
            previous: prev,
        };
        return match jobs.push(job) {
            true => Ok(()),
            false => Err(writer_stopped()),
        };
    } else if file_type.is_dir() {
        summary.dirs += 1;
        // A directory's mtime moves with every change inside it; only its
        // existence and permissions are its version.
        if prev
            .as_ref()
            .is_some_and(|p| p.kind == Kind::Dir && p.mode == stat.mode)
        {
            summary.unchanged += 1;
            return Ok(());
        }
        shared.observed_entry(rel, Kind::Dir, &stat, now)
    } else if file_type.is_symlink() {
        summary.symlinks += 1;
        let target = match fs::read_link(&path) {
            Ok(target) => target,
            Err(e) => {
                shared.skip(&rel, format!("cannot read symlink: {e}"));
                return Ok(());
            }
        };
        let Some(target) = target.to_str().map(str::to_string) else {
            shared.skip(&rel, "symlink target is not valid UTF-8; not recorded");
            return Ok(());
        };
        if prev.as_ref().is_some_and(|p| {
            p.kind == Kind::Symlink && p.link_target.as_deref() == Some(target.as_str())
        }) {
            summary.unchanged += 1;
            return Ok(());
        }
        let mut entry = shared.observed_entry(rel, Kind::Symlink, &stat, now);
        entry.size = target.len() as u64;
        entry.hash = Some(Hash::of(target.as_bytes()));
        entry.link_target = Some(target);
        entry
    } else {
        shared.skip(
            &rel,
            "not a regular file, directory or symlink; not recorded",
        );
        return Ok(());
    };
    let change = Change::replacing(prev.as_ref());
    let record = Record::Append {
        entry,
        chunks: Vec::new(),
    };
    changes
        .send(vec![(change, record)])
        .map_err(|_| writer_stopped())
}

pub(crate) fn describe_walk_error(root: &Path, err: &ignore::Error) -> (String, String) {
    match err {
        ignore::Error::WithPath { path, err } => {
            let rel = relative(root, path).unwrap_or_else(|| path.to_string_lossy().into_owned());
            (rel, format!("cannot read: {err}"))
        }
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            describe_walk_error(root, err)
        }
        other => (String::from("."), other.to_string()),
    }
}

/// Paths the walk did not see are deleted only if they are really gone: an ignored
/// path, an unreadable directory's content or an unmounted subtree stays recorded.
fn record_deletions(shared: &Shared<'_>, unseen: &EntriesByPath, changes: &Sender<Changes>) {
    let now = now_ns();
    let mut dirs = HashMap::new();
    let mut deleted = Vec::new();
    for path in unseen.keys() {
        if is_gone(shared.root, path, &mut dirs) {
            let record = Record::Append {
                entry: shared.new_entry(path.clone(), Kind::Deleted, now),
                chunks: Vec::new(),
            };
            deleted.push((Change::Deleted, record));
            if deleted.len() >= HASH_BATCH && changes.send(std::mem::take(&mut deleted)).is_err() {
                return;
            }
        }
    }
    if !deleted.is_empty() {
        let _ = changes.send(deleted);
    }
}

/// Whether `rel` provably no longer exists in the folder. Its parents are checked
/// one by one without following symlinks: `d/a` is gone once `d` became a symlink,
/// even if the link's target holds an `a`. `dirs` caches what each parent is.
fn is_gone(root: &Path, rel: &str, dirs: &mut HashMap<String, Presence>) -> bool {
    let mut parent_end = 0;
    while let Some(slash) = rel[parent_end..].find('/') {
        parent_end += slash;
        let parent = &rel[..parent_end];
        let presence = *dirs
            .entry(parent.to_string())
            .or_insert_with(|| Presence::of_parent(&root.join(parent)));
        match presence {
            Presence::Directory => {}
            Presence::Gone => return true,
            Presence::Unknown => return false,
        }
        parent_end += 1;
    }
    matches!(fs::symlink_metadata(root.join(rel)), Err(e) if absent(&e))
}

fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// What a parent directory of a recorded path is now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Presence {
    Directory,
    /// Absent, or replaced by something that is not a directory (a file, a symlink).
    Gone,
    /// Cannot tell (no permission, I/O error): assume it is still there.
    Unknown,
}

impl Presence {
    fn of_parent(path: &Path) -> Self {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => Presence::Directory,
            Ok(_) => Presence::Gone,
            Err(e) if absent(&e) => Presence::Gone,
            Err(_) => Presence::Unknown,
        }
    }
}

fn hash_worker(jobs: Receiver<Vec<HashJob>>, changes: Sender<Changes>, shared: &Shared<'_>) {
    let mut hasher = ContentHasher::default();
    for batch in jobs {
        let count = batch.len();
        let mut hashed = Vec::with_capacity(count);
        let mut waiting_since = Instant::now();
        for (done, job) in batch.into_iter().enumerate() {
            hashed.extend(hash_job(&mut hasher, job, shared));
            // A slow disk or a throttled read must not hold back what is hashed.
            let send = done + 1 == count || waiting_since.elapsed() >= HASHED_MAX_WAIT;
            if send && !hashed.is_empty() {
                if changes.send(std::mem::take(&mut hashed)).is_err() {
                    return;
                }
                waiting_since = Instant::now();
            }
        }
    }
}

/// What hashing the file of `job` found; `None` when it is skipped (a warning
/// says why) or the scan was stopped.
fn hash_job(
    hasher: &mut ContentHasher,
    job: HashJob,
    shared: &Shared<'_>,
) -> Option<(Change, Record)> {
    if shared.stopped() {
        return None;
    }
    let hashed = match shared
        .big_files
        .hash(job.stat.size, || hash_stable_file(hasher, &job, shared))
    {
        Ok(Some(hashed)) => hashed,
        Ok(None) => {
            shared.skip(
                &job.rel,
                format!("changed while being read ({HASH_ATTEMPTS} tries); left for the next scan"),
            );
            return None;
        }
        Err(_) if shared.stopped() => return None,
        Err(e) => {
            shared.skip(&job.rel, format!("cannot read: {e}"));
            return None;
        }
    };
    shared.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
    let (content, mut stat) = hashed;
    let now = now_ns();
    if now - stat.mtime_ns < RACY_WINDOW_NS {
        stat.ctime_ns = UNVERIFIED_CTIME;
    }
    Some(match &job.previous {
        Some(prev)
            if prev.kind == Kind::File
                && prev.hash == Some(content.hash)
                && prev.size == stat.size
                && prev.mtime_ns == stat.mtime_ns
                && prev.mode == stat.mode =>
        {
            let refresh = Record::RefreshStat {
                seq: prev.seq,
                inode: stat.inode,
                ctime_ns: stat.ctime_ns,
            };
            (Change::Refreshed, refresh)
        }
        prev => {
            let mut entry = shared.observed_entry(job.rel, Kind::File, &stat, now);
            entry.size = stat.size;
            entry.hash = Some(content.hash);
            let change = Change::replacing(prev.as_ref());
            let record = Record::Append {
                entry,
                chunks: content.chunks,
            };
            (change, record)
        }
    })
}

/// Hashes a file and checks it did not change meanwhile (same stat before and
/// after, as many bytes as its size). `None` if it kept changing.
fn hash_stable_file(
    hasher: &mut ContentHasher,
    job: &HashJob,
    shared: &Shared<'_>,
) -> io::Result<Option<(HashedContent, Stat)>> {
    let mut expected = job.stat;
    for _ in 0..HASH_ATTEMPTS {
        // Non-blocking: if the file was swapped for a FIFO since it was stat'ed,
        // opening it must not wait for a writer (the stat check below then fails).
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&job.abs)?;
        // A file growing as fast as it is read would never reach its end: read one
        // byte past the expected size at most; more than the size means it changed.
        let mut bounded = UntilStopped {
            inner: io::Read::take(&file, expected.size + 1),
            stop: shared.stop.as_deref(),
        };
        let content = hasher.hash_reader(&mut bounded, |n| {
            shared
                .counters
                .bytes_hashed
                .fetch_add(n as u64, Ordering::Relaxed);
            if let Some(throttle) = &shared.throttle {
                throttle.consume(n);
            }
            if let Some(observer) = &shared.observer {
                observer.bytes_read(&job.rel, n as u64);
            }
        })?;
        let opened = Stat::of(&file.metadata()?);
        let current = fs::symlink_metadata(&job.abs)?;
        let after = Stat::of(&current);
        if opened == expected && after == expected && content.size == expected.size {
            return Ok(Some((content, after)));
        }
        if !current.file_type().is_file() {
            return Ok(None);
        }
        expected = after;
    }
    Ok(None)
}

fn scan_stopped() -> Error {
    Error::ScanAborted("stopped".into())
}

/// What a thread of the scan meets once the history writer has failed.
fn writer_stopped() -> Error {
    Error::ScanAborted("the history writer stopped".into())
}

/// Whether a scan's stop flag, if it has one, is set.
fn is_set(stop: Option<&AtomicBool>) -> bool {
    stop.is_some_and(|stop| stop.load(Ordering::Relaxed))
}

/// Reads `inner` until the scan is stopped, then fails: a stopped scan does not
/// finish reading the files it is in (at a read limit, a big one takes long).
struct UntilStopped<'a, R> {
    inner: R,
    stop: Option<&'a AtomicBool>,
}

impl<R: io::Read> io::Read for UntilStopped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if is_set(self.stop) {
            return Err(io::Error::other("the scan was stopped"));
        }
        self.inner.read(buf)
    }
}

/// Gives the calling thread the nice value [`BACKGROUND_NICE`]; on failure it
/// keeps its priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling priority of this thread
    // (Linux takes a thread id for PRIO_PROCESS); any value is valid.
    unsafe {
        let thread = libc::gettid() as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, thread, BACKGROUND_NICE) != 0 {
            tracing::debug!(
                "cannot lower a hashing thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

struct Written {
    new: u64,
    changed: u64,
    deleted: u64,
    refreshed: u64,
}

/// How long a batch of a scan that announces its batches waits at most before
/// it is committed.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(1);
/// Bytes of content at which a batch is committed (and announced) whatever
/// its number of records, when peers hear of each batch.
const BATCH_MAX_BYTES: u64 = 64 << 20;
/// Records in the first batch of a scan that announces its batches.
const FIRST_BATCH: usize = 100;

fn write_changes(
    store: &mut HistoryStore,
    changes: Receiver<Changes>,
    batch_size: usize,
    shared: &Shared<'_>,
) -> Result<Written> {
    let mut written = Written {
        new: 0,
        changed: 0,
        deleted: 0,
        refreshed: 0,
    };
    let mut batch = Vec::with_capacity(batch_size);
    let mut commit = |batch: &mut Vec<Record>| -> Result<()> {
        let seqs = store.write_batch(batch)?;
        if let Some(observer) = &shared.observer {
            observer.batch_committed(batch.len(), seqs.iter().copied().max().unwrap_or(0));
        }
        batch.clear();
        Ok(())
    };
    // When someone hears of each batch (peers, during a first scan), a batch is
    // also committed once it has waited long enough or holds enough content: a
    // few large files would otherwise reach them only at the end of the scan.
    let announced = shared.observer.is_some();
    let mut batch_started: Option<Instant> = None;
    let mut batch_bytes = 0;
    // And the first such batch is small: peers start on it at once.
    let mut announce_first = announced;
    loop {
        let next = match batch_started {
            Some(started) if announced => changes.recv_deadline(started + BATCH_MAX_WAIT),
            _ => changes.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let received = match next {
            Ok(received) => received,
            Err(RecvTimeoutError::Timeout) => {
                commit(&mut batch)?;
                (batch_started, announce_first, batch_bytes) = (None, false, 0);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for (change, record) in received {
            match change {
                Change::New => written.new += 1,
                Change::Changed => written.changed += 1,
                Change::Deleted => written.deleted += 1,
                Change::Refreshed => written.refreshed += 1,
            }
            if let Record::Append { entry, .. } = &record {
                batch_bytes += entry.size;
            }
            batch.push(record);
            batch_started.get_or_insert_with(Instant::now);
            if batch.len() >= batch_size
                || (announce_first && batch.len() >= FIRST_BATCH)
                || (announced && batch_bytes >= BATCH_MAX_BYTES)
            {
                commit(&mut batch)?;
                (batch_started, announce_first, batch_bytes) = (None, false, 0);
            }
        }
    }
    if !batch.is_empty() {
        commit(&mut batch)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_walking_thread_holds_files_back_but_sends_a_directory_at_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("f"), b"x").unwrap();
        let found = |name: &str| {
            let path = dir.path().join(name);
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = name.to_string();
            Found::Entry(Walked { rel, path, meta })
        };
        let (sender, sent) = crossbeam_channel::unbounded();
        let mut batch = FoundBatch {
            sender,
            found: Vec::new(),
        };
        assert!(batch.push(found("f")));
        assert!(sent.is_empty());
        assert!(batch.push(found("d")));
        let names: Vec<String> = sent
            .try_iter()
            .flatten()
            .map(|found| match found {
                Found::Entry(walked) => walked.rel,
                Found::Skipped { path, .. } => path,
            })
            .collect();
        assert_eq!(names, ["f", "d"]);
    }

    #[test]
    fn relative_paths_are_the_components_under_the_root_joined_by_slashes() {
        let cases: [(&str, &[u8], Option<&str>); 10] = [
            ("/r", b"/r/a/b", Some("a/b")),
            ("/r/", b"/r/a", Some("a")),
            ("/r", b"/r//a", Some("a")),
            ("/r", b"/r/./a", Some("a")),
            ("/r", b"/r/a/", Some("a")),
            ("/r", b"/r/a/../b", Some("a/../b")),
            ("/r", b"/r", Some("")),
            ("/r", b"/rx/a", None),
            ("/r", b"/r/a\xff", None),
            ("r", b"r/.a/b.", Some(".a/b.")),
        ];
        for (root, path, expected) in cases {
            let path = Path::new(OsStr::from_bytes(path));
            assert_eq!(
                relative(Path::new(root), path).as_deref(),
                expected,
                "{root} {path:?}"
            );
        }
    }
}
