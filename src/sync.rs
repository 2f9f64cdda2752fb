//! `latus sync A B`: two folders on this machine synced both ways, each with its
//! own history, through the same engine a network peer uses: scan, exchange the
//! histories since the last sequence seen, plan each side, apply.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::device::PeerId;
use crate::diff::{self, ConflictCopy, Plan};
use crate::error::{Error, Result};
use crate::folder::Folder;
use crate::history::{Entry, HistoryStore, Kind};
use crate::merge::{self, MergeOptions, MergeReport};
use crate::peer::{FolderPeer, Peer};
use crate::scan::{self, ScanObserver, ScanOptions};
use crate::trash;

/// History entries per exchange request.
const EXCHANGE_BATCH: usize = 10_000;

pub struct SyncOptions {
    /// Plan only: print what would be done, change no file.
    pub dry_run: bool,
    pub allow_mass_delete: bool,
    /// A plan deleting more than this share of a folder's files stops the sync…
    pub mass_delete_percent: u32,
    /// …when the folder holds at least this many files.
    pub mass_delete_min_files: usize,
    pub trash_keep_days: u32,
    /// Rounds of scan + plan + apply before giving up on convergence (a file that
    /// keeps changing).
    pub max_rounds: usize,
    pub scan: ScanOptions,
    pub merge: MergeOptions,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            dry_run: false,
            allow_mass_delete: false,
            mass_delete_percent: 50,
            mass_delete_min_files: 10,
            trash_keep_days: 30,
            max_rounds: 5,
            scan: ScanOptions::default(),
            merge: MergeOptions::default(),
        }
    }
}

/// One planned action, for `--dry-run` and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    /// The root the action changes.
    pub root: PathBuf,
    pub op: &'static str,
    pub path: String,
    pub line: String,
}

#[derive(Debug, Default, Serialize)]
pub struct SideReport {
    pub root: PathBuf,
    pub applied: usize,
    pub bytes_local: u64,
    pub bytes_fetched: u64,
    pub files_hashed: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub a: SideReport,
    pub b: SideReport,
    pub rounds: usize,
    /// The plan (dry run) or what was applied.
    pub actions: Vec<PlannedAction>,
    pub conflicts: Vec<ConflictCopy>,
    /// Both roots hold the same paths with the same content, mtimes and modes.
    pub identical: bool,
    /// The first paths that still differ when not identical.
    pub differences: Vec<String>,
    pub warnings: Vec<String>,
    pub interrupted: bool,
}

/// Syncs the folders at `a` and `b` both ways.
pub fn sync(a: &Path, b: &Path, options: &SyncOptions) -> Result<SyncReport> {
    let (folder_a, folder_b) = open_pair(a, b)?;
    let _locks = (folder_a.lock()?, folder_b.lock()?);
    let mut store_a = HistoryStore::open(&folder_a.history_path())?;
    let mut store_b = HistoryStore::open(&folder_b.history_path())?;
    if !options.dry_run {
        for folder in [&folder_a, &folder_b] {
            trash::purge(folder, options.trash_keep_days)?;
        }
    }
    let mut report = SyncReport {
        a: SideReport {
            root: folder_a.root().to_path_buf(),
            ..SideReport::default()
        },
        b: SideReport {
            root: folder_b.root().to_path_buf(),
            ..SideReport::default()
        },
        ..SyncReport::default()
    };

    let mut rescan = true;
    if !options.dry_run {
        let (empty_a, empty_b) = (
            is_empty(&folder_a, &store_a)?,
            is_empty(&folder_b, &store_b)?,
        );
        let sides = match (empty_a, empty_b) {
            (false, true) => Some(((&folder_a, &mut store_a), (&folder_b, &mut store_b), false)),
            (true, false) => Some(((&folder_b, &mut store_b), (&folder_a, &mut store_a), true)),
            _ => None,
        };
        if let Some((full, empty, empty_is_a)) = sides {
            let deferred = fill_while_scanning(full, empty, empty_is_a, options, &mut report)?;
            if report.interrupted {
                return Ok(report);
            }
            // Both sides are scanned: a round now plans what is left.
            rescan = deferred;
        }
    }
    // The differences found right after a round that applied everything.
    let mut compared = None;
    while report.rounds < options.max_rounds {
        report.rounds += 1;
        let started = std::time::Instant::now();
        if rescan {
            let (scanned_a, scanned_b) = side_by_side(
                || scan_folder(&folder_a, &mut store_a, &options.scan),
                || scan_folder(&folder_b, &mut store_b, &options.scan),
            )?;
            report.a.files_hashed += scanned_a.files_hashed;
            report.b.files_hashed += scanned_b.files_hashed;
            report.warnings.extend(scanned_a.warnings);
            report.warnings.extend(scanned_b.warnings);
            tracing::debug!(
                "round {}: scanned both in {:?}",
                report.rounds,
                started.elapsed()
            );
        }
        let peer_a = FolderPeer::open(&folder_a)?;
        let peer_b = FolderPeer::open(&folder_b)?;
        let (plan_a, plan_b) = side_by_side(
            || {
                exchange(&mut store_a, &peer_b)?;
                diff::plan(&store_a, &peer_b.id())
            },
            || {
                exchange(&mut store_b, &peer_a)?;
                diff::plan(&store_b, &peer_a.id())
            },
        )?;
        report.warnings.extend(plan_a.warnings.iter().cloned());
        report.warnings.extend(plan_b.warnings.iter().cloned());
        tracing::debug!(
            "round {}: exchanged and planned ({} + {} actions) at {:?}",
            report.rounds,
            plan_a.actions.len(),
            plan_b.actions.len(),
            started.elapsed()
        );
        if plan_a.is_empty() && plan_b.is_empty() {
            break;
        }
        if !options.allow_mass_delete {
            check_mass_delete(&folder_a, &store_a, &plan_a, options)?;
            check_mass_delete(&folder_b, &store_b, &plan_b, options)?;
        }
        if options.dry_run {
            report.actions.extend(planned(folder_a.root(), &plan_a));
            report.actions.extend(planned(folder_b.root(), &plan_b));
            report.conflicts.extend(plan_a.conflicts());
            report.conflicts.extend(plan_b.conflicts());
            return Ok(report);
        }
        report.actions.extend(planned(folder_a.root(), &plan_a));
        report.actions.extend(planned(folder_b.root(), &plan_b));
        let merged_a = merge::apply(&folder_a, &mut store_a, &peer_b, plan_a, &options.merge)?;
        if merged_a.interrupted {
            report.interrupted = true;
            return Ok(report);
        }
        let merged_b = merge::apply(&folder_b, &mut store_b, &peer_a, plan_b, &options.merge)?;
        report.interrupted = merged_b.interrupted;
        tracing::debug!(
            "round {}: applied at {:?}",
            report.rounds,
            started.elapsed()
        );
        rescan = !merged_a.deferred.is_empty() || !merged_b.deferred.is_empty();
        report.absorb(true, merged_a);
        report.absorb(false, merged_b);
        if report.interrupted {
            return Ok(report);
        }
        // Everything applied: when both sides are now identical, another round
        // would plan nothing, so the final comparison ends the sync here.
        if !rescan {
            let differ = compare(&mut store_a, &folder_a, &mut store_b, &folder_b)?;
            if differ.is_empty() {
                compared = Some(differ);
                break;
            }
        }
    }

    report.differences = match compared {
        Some(differ) => differ,
        None => compare(&mut store_a, &folder_a, &mut store_b, &folder_b)?,
    };
    report.identical = report.differences.is_empty();
    if report.identical {
        let (id_a, id_b) = (store_a.replica_id()?, store_b.replica_id()?);
        store_a.mark_identical(&id_b)?;
        store_b.mark_identical(&id_a)?;
    }
    Ok(report)
}

/// Whether `folder` holds nothing and its history has no entry: a new folder.
fn is_empty(folder: &Folder, store: &HistoryStore) -> Result<bool> {
    if store.last_seq()? != 0 {
        return Ok(false);
    }
    let root = folder.root();
    for child in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let child = child.map_err(|e| Error::io(root, e))?;
        if child.file_name() != crate::folder::MARKER_DIR {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Tells the thread filling the empty side that the scan committed a batch,
/// and passes everything on to the caller's observer, if any.
struct BatchSignal {
    committed: crossbeam_channel::Sender<()>,
    inner: Option<Arc<dyn ScanObserver>>,
}

impl ScanObserver for BatchSignal {
    fn bytes_read(&self, path: &str, bytes: u64) {
        if let Some(inner) = &self.inner {
            inner.bytes_read(path, bytes);
        }
    }

    fn entry_walked(&self) {
        if let Some(inner) = &self.inner {
            inner.entry_walked();
        }
    }

    fn batch_committed(&self, entries: usize, last_seq: u64) {
        if let Some(inner) = &self.inner {
            inner.batch_committed(entries, last_seq);
        }
        // The filling side may have stopped (an error): the scan goes on.
        let _ = self.committed.send(());
    }
}

/// A first sync into an empty folder: `full` is scanned while `empty` receives,
/// plans and applies each batch that scan commits, as rsync writes while it
/// reads, instead of waiting for the whole scan. Only `empty`'s side is applied
/// here, and only from what the scan recorded so far: in a folder that held
/// nothing there is nothing to move, delete or conflict with, so the partial
/// history is safe to follow. The rounds after it plan everything again.
/// Returns whether some action waits for a rescan.
fn fill_while_scanning(
    (full, store_full): (&Folder, &mut HistoryStore),
    (empty, store_empty): (&Folder, &mut HistoryStore),
    empty_is_a: bool,
    options: &SyncOptions,
    report: &mut SyncReport,
) -> Result<bool> {
    let scanned_empty = scan_folder(empty, store_empty, &options.scan)?;
    report.warnings.extend(scanned_empty.warnings);
    let (committed_tx, committed_rx) = crossbeam_channel::unbounded();
    let signal = BatchSignal {
        committed: committed_tx,
        inner: options.scan.observer.clone(),
    };
    // A fill that fails (a full disk) stops the scan: the error comes at once,
    // not after the rest of the full side was read for nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let scan_options = ScanOptions {
        observer: Some(Arc::new(signal)),
        stop: Some(Arc::clone(&stop)),
        ..options.scan.clone()
    };
    let mut deferred = false;
    let (scanned, filled) = std::thread::scope(|s| {
        // The options (and the signal's sender in them) go with the thread: the
        // channel closes when the scan ends.
        let scanner = s.spawn(move || scan_folder(full, store_full, &scan_options));
        let filled = (|| -> Result<()> {
            let peer = FolderPeer::open(full)?;
            while committed_rx.recv().is_ok() {
                while committed_rx.try_recv().is_ok() {}
                let mut received = Vec::new();
                receive(store_empty, &peer, peer.root().to_str(), |batch| {
                    received.extend(batch)
                })?;
                let plan = diff::plan_received(store_empty, &peer.id(), received)?;
                if plan.is_empty() {
                    continue;
                }
                if !options.allow_mass_delete {
                    check_mass_delete(empty, store_empty, &plan, options)?;
                }
                report.warnings.extend(plan.warnings.iter().cloned());
                report.actions.extend(planned(empty.root(), &plan));
                let merged = merge::apply(empty, store_empty, &peer, plan, &options.merge)?;
                deferred |= !merged.deferred.is_empty();
                report.interrupted = merged.interrupted;
                report.absorb(empty_is_a, merged);
                if report.interrupted {
                    break;
                }
            }
            Ok(())
        })();
        // Whatever stopped the filling, the scan ends before the sync goes on.
        if filled.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(committed_rx);
        let scanned = scanner
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("a scan thread panicked".into())));
        (scanned, filled)
    });
    filled?;
    let scanned = scanned?;
    let side = if empty_is_a {
        &mut report.b
    } else {
        &mut report.a
    };
    side.files_hashed += scanned.files_hashed;
    report.warnings.extend(scanned.warnings);
    Ok(deferred)
}

/// Exchanges what each side lacks of the other's history, then lists the paths
/// whose current state still differs.
fn compare(
    store_a: &mut HistoryStore,
    folder_a: &Folder,
    store_b: &mut HistoryStore,
    folder_b: &Folder,
) -> Result<Vec<String>> {
    let peer_a = FolderPeer::open(folder_a)?;
    let peer_b = FolderPeer::open(folder_b)?;
    side_by_side(|| exchange(store_a, &peer_b), || exchange(store_b, &peer_a))?;
    differences(store_a, &peer_b.id(), store_b, &peer_a.id())
}

/// Runs `a` on a thread of its own beside `b`. Each side's work writes only its
/// own history and reads the other's own entries (not the remote ones the other
/// side's work writes), so the two need no order.
fn side_by_side<A: Send, B>(
    a: impl FnOnce() -> Result<A> + Send,
    b: impl FnOnce() -> Result<B>,
) -> Result<(A, B)> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(a);
        let b = b();
        let a = a
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("a sync thread panicked".into())));
        (a, b)
    });
    Ok((a?, b?))
}

impl SyncReport {
    fn absorb(&mut self, side_a: bool, merged: MergeReport) {
        let side = if side_a { &mut self.a } else { &mut self.b };
        side.applied += merged.applied;
        side.bytes_local += merged.bytes_local;
        side.bytes_fetched += merged.bytes_fetched;
        self.conflicts.extend(merged.conflicts);
        self.warnings.extend(merged.warnings);
    }
}

fn scan_folder(
    folder: &Folder,
    store: &mut HistoryStore,
    options: &ScanOptions,
) -> Result<scan::ScanSummary> {
    let replica = store.replica_id()?;
    scan::scan(folder, store, replica, options)
}

/// Receives the peer's history entries after the last one received.
pub fn exchange(store: &mut HistoryStore, peer: &FolderPeer) -> Result<()> {
    exchange_with(store, peer, peer.root().to_str())
}

/// Receives the entries of any peer after the last one received; `root` is
/// where a local peer's folder is (to tell an unmounted drive later).
pub fn exchange_with(store: &mut HistoryStore, peer: &dyn Peer, root: Option<&str>) -> Result<()> {
    receive(store, peer, root, drop)
}

/// [`exchange_with`], handing each batch received to `keep` once stored.
fn receive(
    store: &mut HistoryStore,
    peer: &dyn Peer,
    root: Option<&str>,
    mut keep: impl FnMut(Vec<Entry>),
) -> Result<()> {
    let id = peer.id();
    let mut last = store.remote_state(&id)?.map_or(0, |(seq, _)| seq);
    loop {
        let batch = peer.changes_since(last, EXCHANGE_BATCH)?;
        // Only an empty answer is the end: a peer may send fewer than asked (a
        // network peer sends at most `protocol::MAX_ENTRIES` at a time).
        let Some(entry) = batch.last() else {
            return Ok(());
        };
        last = entry.seq;
        store.store_remote(&id, &batch, last, root)?;
        keep(batch);
    }
}

/// Opens both roots. A root without `.latus/` becomes a Latus folder, unless the
/// other side has synced with a folder at that path before: then it is an
/// unmounted drive (or a wiped folder), and reading it as "everything was
/// deleted" would delete everything on the other side.
fn open_pair(a: &Path, b: &Path) -> Result<(Folder, Folder)> {
    let root_a = prepare_root(a, b)?;
    let root_b = prepare_root(b, a)?;
    if root_a.starts_with(&root_b) || root_b.starts_with(&root_a) {
        return Err(Error::UnsafePath {
            path: format!("{} and {}", root_a.display(), root_b.display()),
            reason: "one root is inside the other",
        });
    }
    Ok((
        Folder::open_or_create(&root_a)?,
        Folder::open_or_create(&root_b)?,
    ))
}

/// `root` canonicalised, created if missing (its parent must exist), and checked
/// against `other`'s memory of it.
fn prepare_root(root: &Path, other: &Path) -> Result<PathBuf> {
    let marker_missing = match Folder::open(root) {
        Ok(folder) => return Ok(folder.root().to_path_buf()),
        Err(Error::NotAFolder(_)) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => return Err(e),
    };
    let absolute = std::path::absolute(root).map_err(|e| Error::io(root, e))?;
    if let Ok(other) = Folder::open(other)
        && let Ok(store) = HistoryStore::open_read_only(&other.history_path())
    {
        let canonical = absolute.canonicalize().unwrap_or_else(|_| absolute.clone());
        if store.knows_root(&canonical.to_string_lossy())? {
            return Err(Error::MissingMarker(absolute));
        }
    }
    if !marker_missing {
        std::fs::create_dir(&absolute).map_err(|e| Error::io(&absolute, e))?;
    }
    absolute.canonicalize().map_err(|e| Error::io(&absolute, e))
}

pub(crate) fn check_mass_delete(
    folder: &Folder,
    store: &HistoryStore,
    plan: &Plan,
    options: &SyncOptions,
) -> Result<()> {
    let deletes = plan.deletions();
    if deletes == 0 {
        return Ok(());
    }
    let files = store
        .latest_existing()?
        .iter()
        .filter(|e| e.kind != Kind::Dir)
        .count();
    if files >= options.mass_delete_min_files
        && deletes * 100 > files * options.mass_delete_percent as usize
    {
        return Err(Error::MassDelete {
            root: folder.root().to_path_buf(),
            deletes,
            files,
            percent: options.mass_delete_percent,
        });
    }
    Ok(())
}

fn planned(root: &Path, plan: &Plan) -> Vec<PlannedAction> {
    plan.actions
        .iter()
        .map(|a| PlannedAction {
            root: root.to_path_buf(),
            op: a.op_name(),
            path: a.path().to_string(),
            line: a.describe(),
        })
        .collect()
}

/// What a sync makes equal on both sides: the kind, content, and the metadata it
/// sets (mtime of files and symlinks, mode of files and directories).
fn synced_state(e: &Entry) -> (Kind, u64, i64, u32, Option<crate::content::Hash>) {
    let mtime = if e.kind == Kind::Dir { 0 } else { e.mtime_ns };
    let mode = if e.kind == Kind::Symlink { 0 } else { e.mode };
    (e.kind, e.size, mtime, mode, e.hash)
}

/// Paths whose current state differs between the two histories (at most 20).
/// Once both were found identical, only the paths with entries since then on
/// either side are compared. (`&mut`: a store can go to another thread, not be
/// shared with one, and each side's history may be read on a thread of its own.)
fn differences(
    a: &mut HistoryStore,
    peer_b: &PeerId,
    b: &mut HistoryStore,
    peer_a: &PeerId,
) -> Result<Vec<String>> {
    let (a_now, b_now) = match (a.identical_marks(peer_b)?, b.identical_marks(peer_a)?) {
        (Some(marks_a), Some(marks_b)) => {
            let (a_now, _) = a.latest_changed_since(peer_b, marks_a)?;
            let (b_now, _) = b.latest_changed_since(peer_a, marks_b)?;
            let (mut a_now, mut b_now) = (by_path(a_now), by_path(b_now));
            // The marks of the two sides are written one after the other: a path
            // one side lists is looked up on the other, whatever its marks say.
            complete(&mut a_now, &b_now, a)?;
            complete(&mut b_now, &a_now, b)?;
            (a_now, b_now)
        }
        _ => side_by_side(
            move || Ok(by_path(a.latest_all()?)),
            move || Ok(by_path(b.latest_all()?)),
        )?,
    };
    let state = |e: Option<&Entry>| e.filter(|e| e.kind != Kind::Deleted).map(synced_state);
    let mut differ: Vec<String> = a_now
        .keys()
        .chain(b_now.keys())
        .filter(|path| state(a_now.get(*path)) != state(b_now.get(*path)))
        .cloned()
        .collect();
    differ.sort();
    differ.dedup();
    differ.truncate(20);
    Ok(differ)
}

fn by_path(entries: Vec<Entry>) -> BTreeMap<String, Entry> {
    entries.into_iter().map(|e| (e.path.clone(), e)).collect()
}

/// Adds to `entries` the current entry in `store` of each path of `others` it lacks.
fn complete(
    entries: &mut BTreeMap<String, Entry>,
    others: &BTreeMap<String, Entry>,
    store: &HistoryStore,
) -> Result<()> {
    for path in others.keys() {
        if !entries.contains_key(path)
            && let Some(entry) = store.latest_by_path(path)?
        {
            entries.insert(path.clone(), entry);
        }
    }
    Ok(())
}
