//! Device mode, the seed's "sync with iriver": `latus sync --device SRC DEV`.
//!
//! DEV is a dumb target (a music player, a USB stick) with FAT/exFAT semantics:
//! mtimes in 2 s steps, case-insensitive names, no symlinks, no permissions. DEV is
//! never hashed to find changes: a file there is unchanged while its size and
//! mtime are the ones SRC's history recorded when Latus last wrote it. Only a DEV
//! file that changed (or that Latus never wrote) is read, to compare it with SRC
//! or to bring it back.
//!
//! SRC is an ordinary Latus folder. Its changes reach DEV the cheapest way: a move
//! on SRC is a rename on DEV, a copy a copy within DEV. Changes made on DEV (a song
//! deleted on the player) flow back into SRC through the merger, with the device as
//! their author, unless `--one-way`: then DEV mirrors SRC, and what was changed on
//! DEV goes to DEV's trash. A version is never lost: on DEV, a replaced or deleted
//! file goes to `DEV/.latus/trash/` unless it is an unchanged copy of a content SRC
//! still holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::content::{ChunkInfo, ContentHasher, Hash, HashedContent};
use crate::device::PeerId;
use crate::diff::{self, Action, ConflictCopy, Op, Plan};
use crate::error::{Error, Result};
use crate::folder::{Folder, check_relative};
use crate::history::{DeviceRecord, Entry, HistoryStore, Kind};
use crate::merge::{self, clear_dir, mtime_of, prepare_parent, rename_no_replace, set_mtime};
use crate::now_ns;
use crate::peer::{Peer, is_gone, read_verified};
use crate::scan;
use crate::sync::{PlannedAction, SideReport, SyncOptions, SyncReport};
use crate::trash::{self, Trash};

/// FAT keeps mtimes in 2 s steps: two mtimes this close are the same.
const MTIME_WINDOW_NS: i64 = 2_000_000_000;
/// In DEV's `.latus/`: the random id that names the device in SRC's history.
const DEVICE_ID_FILE: &str = "device-id";
const TMP_DIR: &str = "tmp";
/// Mode of files and directories brought back from a device that has none.
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// Syncs the Latus folder `src` with the dumb device at `dev`.
pub fn sync_device(
    src: &Path,
    dev: &Path,
    options: &SyncOptions,
    one_way: bool,
) -> Result<SyncReport> {
    let src_folder = Folder::open_or_create(src)?;
    let mut store = HistoryStore::open(&src_folder.history_path())?;
    let (dev_folder, device) = open_device(dev, &src_folder, &store)?;
    let _locks = (src_folder.lock()?, dev_folder.lock()?);
    if !options.dry_run {
        for folder in [&src_folder, &dev_folder] {
            trash::purge(folder, options.trash_keep_days)?;
        }
        clear_dir(&dev_folder.marker_dir().join(TMP_DIR))?;
    }
    let mut report = SyncReport {
        a: SideReport {
            root: src_folder.root().to_path_buf(),
            ..SideReport::default()
        },
        b: SideReport {
            root: dev_folder.root().to_path_buf(),
            ..SideReport::default()
        },
        ..SyncReport::default()
    };
    let mut warnings = BTreeSet::new();
    let mut pending = Vec::new();
    let mut deferred = 0;
    while report.rounds < options.max_rounds {
        report.rounds += 1;
        let replica = store.replica_id()?;
        let scanned = scan::scan(&src_folder, &mut store, replica, &options.scan)?;
        report.a.files_hashed += scanned.files_hashed;
        warnings.extend(scanned.warnings);

        let state = State::load(&store, &dev_folder, &device)?;
        let plan = Planner::new(state, device, one_way).plan()?;
        warnings.extend(plan.warnings.iter().cloned());
        pending = plan.describe(src_folder.root(), dev_folder.root());
        deferred = plan.deferred;
        if pending.is_empty() && deferred == 0 {
            break;
        }
        if !options.allow_mass_delete {
            plan.check_mass_delete(&src_folder, &dev_folder, options)?;
        }
        if options.dry_run {
            report.actions = pending;
            report.conflicts = plan.conflicts;
            report.warnings = warnings.into_iter().collect();
            return Ok(report);
        }
        report.actions.extend(pending.iter().cloned());
        apply(
            &src_folder,
            &dev_folder,
            &mut store,
            device,
            plan,
            options,
            &mut report,
        )?;
        if report.interrupted {
            break;
        }
    }
    report.differences = pending.iter().map(|a| a.path.clone()).take(20).collect();
    // A device file that kept changing while read is not known to be in sync.
    report.identical = pending.is_empty() && deferred == 0 && !report.interrupted;
    report.warnings = warnings.into_iter().collect();
    Ok(report)
}

/// The device's root and id. A root without the marker that SRC has synced before
/// is an unmounted device (an empty mount point), not "everything was deleted".
fn open_device(dev: &Path, src: &Folder, store: &HistoryStore) -> Result<(Folder, PeerId)> {
    let root = dev.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(dev.to_path_buf()),
        _ => Error::io(dev, e),
    })?;
    if !root.is_dir() {
        return Err(Error::NotADirectory(root));
    }
    if root.starts_with(src.root()) || src.root().starts_with(&root) {
        return Err(Error::UnsafePath {
            path: format!("{} and {}", src.root().display(), root.display()),
            reason: "one root is inside the other",
        });
    }
    let id_file = root.join(crate::folder::MARKER_DIR).join(DEVICE_ID_FILE);
    match fs::read_to_string(&id_file) {
        Ok(text) => {
            let id = data_encoding::HEXLOWER
                .decode(text.trim().as_bytes())
                .ok()
                .and_then(|bytes| PeerId::from_slice(&bytes))
                .ok_or_else(|| Error::DeviceState {
                    path: id_file.clone(),
                    reason: "not a device id (64 hex digits)".into(),
                })?;
            Ok((Folder::open(&root)?, id))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if store.knows_device_root(&root.to_string_lossy())? {
                return Err(Error::MissingMarker(root));
            }
            let folder = Folder::open_or_create(&root)?;
            let id = PeerId::random()?;
            fs::write(&id_file, data_encoding::HEXLOWER.encode(&id.0))
                .map_err(|e| Error::io(&id_file, e))?;
            Ok((folder, id))
        }
        Err(e) => Err(Error::io(&id_file, e)),
    }
}

/// The device's names are case-insensitive: paths are compared by this key.
fn fold(path: &str) -> String {
    path.to_lowercase()
}

fn last_component(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn parent_key(key: &str) -> Option<&str> {
    key.rfind('/').map(|i| &key[..i])
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn mtimes_match(a: i64, b: i64) -> bool {
    (a - b).abs() <= MTIME_WINDOW_NS
}

/// Size and mtime: all the device tells about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DevKind {
    File,
    Dir,
}

#[derive(Debug, Clone)]
struct DevItem {
    path: String,
    kind: DevKind,
    stamp: Stamp,
}

/// SRC's current files, the device's tree and what was recorded of it, by key.
struct State {
    src: BTreeMap<String, Entry>,
    dev: BTreeMap<String, DevItem>,
    records: HashMap<String, DeviceRecord>,
    /// Keys left alone (and everything under them), with a warning each.
    skipped: BTreeSet<String>,
    /// Contents SRC holds in a current file: a device copy of one may go without
    /// a trip to the trash.
    src_contents: HashSet<Hash>,
    dev_root: PathBuf,
    warnings: Vec<String>,
}

impl State {
    fn load(store: &HistoryStore, dev: &Folder, device: &PeerId) -> Result<Self> {
        let mut state = State {
            src: BTreeMap::new(),
            dev: BTreeMap::new(),
            records: store
                .device_records(device)?
                .into_iter()
                .map(|r| (r.key.clone(), r))
                .collect(),
            skipped: BTreeSet::new(),
            src_contents: HashSet::new(),
            dev_root: dev.root().to_path_buf(),
            warnings: Vec::new(),
        };
        state.walk_device()?;
        let mut by_key: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for entry in store.latest_existing()? {
            if entry.kind == Kind::Symlink {
                state.warnings.push(format!(
                    "{}: a symlink; not copied (the device cannot hold symlinks)",
                    entry.path
                ));
                continue;
            }
            if entry.kind == Kind::File
                && let Some(hash) = entry.hash
            {
                state.src_contents.insert(hash);
            }
            by_key.entry(fold(&entry.path)).or_default().push(entry);
        }
        for (key, mut entries) in by_key {
            // Names that differ only in case cannot all be on the device: the one
            // already there (or recorded) keeps its place, the others stay on SRC.
            if entries.len() > 1 {
                let on_device = state
                    .dev
                    .get(&key)
                    .map(|d| d.path.clone())
                    .or_else(|| state.records.get(&key).map(|r| r.path.clone()));
                entries.sort_by_key(|e| (Some(&e.path) != on_device.as_ref(), e.path.clone()));
                for other in &entries[1..] {
                    state.warnings.push(format!(
                        "{}: not copied to the device, its name differs only in case from {}",
                        other.path, entries[0].path
                    ));
                }
            }
            entries.truncate(1);
            if let Some(entry) = entries.pop() {
                state.src.insert(key, entry);
            }
        }
        Ok(state)
    }

    fn walk_device(&mut self) -> Result<()> {
        let bad_names = Arc::new(Mutex::new(Vec::new()));
        let seen_bad = Arc::clone(&bad_names);
        let walker = scan::folder_walker(&self.dev_root, move |shown| {
            if let Ok(mut names) = seen_bad.lock() {
                names.push(shown.to_string());
            }
        });
        let mut duplicates = BTreeSet::new();
        for item in walker {
            let dirent = match item {
                Ok(dirent) => dirent,
                Err(err) => {
                    // What an unreadable directory holds is unknown, not deleted.
                    let (path, reason) = scan::describe_walk_error(&self.dev_root, &err);
                    self.skip(&fold(&path), format!("{path} on the device: {reason}"));
                    continue;
                }
            };
            if dirent.depth() == 0 {
                continue;
            }
            let Some(rel) = scan::relative(&self.dev_root, dirent.path()) else {
                continue;
            };
            let key = fold(&rel);
            let meta = match fs::symlink_metadata(dirent.path()) {
                Ok(meta) => meta,
                Err(e) => {
                    self.skip(&key, format!("{rel} on the device: cannot stat: {e}"));
                    continue;
                }
            };
            let kind = if meta.is_file() {
                DevKind::File
            } else if meta.is_dir() {
                DevKind::Dir
            } else {
                self.skip(
                    &key,
                    format!("{rel} on the device: not a file or directory; left alone"),
                );
                continue;
            };
            let item = DevItem {
                path: rel,
                kind,
                stamp: Stamp {
                    size: if kind == DevKind::File {
                        meta.size()
                    } else {
                        0
                    },
                    mtime_ns: mtime_of(&meta),
                },
            };
            if self.dev.insert(key.clone(), item).is_some() {
                duplicates.insert(key);
            }
        }
        for key in duplicates {
            self.skip(
                &key,
                format!("{key} on the device: several names differ only in case; left alone"),
            );
        }
        if let Ok(names) = bad_names.lock() {
            for name in names.iter() {
                self.skip(
                    &fold(name),
                    format!("{name} on the device: name is not valid UTF-8; left alone"),
                );
            }
        }
        Ok(())
    }

    fn skip(&mut self, key: &str, warning: String) {
        self.skipped.insert(key.to_string());
        self.warnings.push(warning);
    }

    fn is_skipped(&self, key: &str) -> bool {
        let mut prefix = key;
        loop {
            if self.skipped.contains(prefix) {
                return true;
            }
            match parent_key(prefix) {
                Some(parent) => prefix = parent,
                None => return false,
            }
        }
    }

    /// Where `key` is (or will be) on the device once the case renames ran: SRC's
    /// spelling where SRC has the path, else the device's, else the record's.
    fn dev_path(&self, key: &str) -> String {
        let name = self
            .src
            .get(key)
            .map(|e| e.path.as_str())
            .or_else(|| self.dev.get(key).map(|d| d.path.as_str()))
            .or_else(|| self.records.get(key).map(|r| r.path.as_str()))
            .map_or(last_component(key), last_component);
        match parent_key(key) {
            Some(parent) => join(&self.dev_path(parent), name),
            None => name.to_string(),
        }
    }
}

/// A step on the device.
#[derive(Debug)]
enum DevOp {
    /// A name that differs from SRC's only in case.
    CaseRename {
        from: String,
        to: String,
    },
    /// The device's version lost a conflict: it moves to the conflict copy's name.
    SetAside {
        from: String,
        to: String,
        expect: Stamp,
        record: DeviceRecord,
    },
    /// `keep`: to the trash (else removed: an unchanged copy of content SRC holds).
    Remove {
        key: String,
        path: String,
        expect: Stamp,
        keep: bool,
        /// The content, when it is an unchanged copy Latus wrote: a move source.
        hash: Option<Hash>,
    },
    MakeDir {
        key: String,
        path: String,
    },
    /// Puts SRC's file `content` at `path`, over `old` if set.
    Write {
        key: String,
        path: String,
        content: Entry,
        old: Option<(Stamp, bool)>,
        source: Source,
    },
    SetMtime {
        key: String,
        path: String,
        expect: Stamp,
        content: Entry,
    },
    RemoveDir {
        key: String,
        path: String,
    },
}

/// Where a written file's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Src,
    /// Rename this device file, which had to go anyway.
    Move {
        key: String,
        path: String,
        expect: Stamp,
    },
    /// Copy this device file, which stays.
    Copy {
        path: String,
        expect: Stamp,
    },
}

impl DevOp {
    fn order(&self) -> (u8, i64) {
        let depth = |path: &str| path.matches('/').count() as i64;
        match self {
            DevOp::CaseRename { from, .. } => (0, depth(from)),
            DevOp::SetAside { .. } => (1, 0),
            DevOp::Remove { .. } => (2, 0),
            DevOp::MakeDir { path, .. } => (3, depth(path)),
            DevOp::Write { .. } | DevOp::SetMtime { .. } => (4, 0),
            DevOp::RemoveDir { path, .. } => (5, -depth(path)),
        }
    }

    fn describe(&self) -> (&'static str, String, String) {
        match self {
            DevOp::CaseRename { from, to } => {
                ("move", to.clone(), format!("rename {from} -> {to}"))
            }
            DevOp::SetAside { from, to, .. } => (
                "conflict",
                from.clone(),
                format!("conflict {from}: the device's version is kept as {to}"),
            ),
            DevOp::Remove { path, .. } => ("delete", path.clone(), format!("delete {path}")),
            DevOp::MakeDir { path, .. } => ("mkdir", path.clone(), format!("mkdir {path}")),
            DevOp::Write {
                path,
                content,
                source,
                old,
                ..
            } => match source {
                Source::Move { path: from, .. } => {
                    ("move", path.clone(), format!("move {from} -> {path}"))
                }
                Source::Copy { path: from, .. } => {
                    ("copy", path.clone(), format!("copy {from} -> {path}"))
                }
                Source::Src if old.is_some() => (
                    "replace",
                    path.clone(),
                    format!("replace {path} ({} bytes)", content.size),
                ),
                Source::Src => (
                    "copy",
                    path.clone(),
                    format!("copy {} -> {path} ({} bytes)", content.path, content.size),
                ),
            },
            DevOp::SetMtime { path, .. } => ("meta", path.clone(), format!("meta {path}")),
            DevOp::RemoveDir { path, .. } => ("delete", path.clone(), format!("rmdir {path}")),
        }
    }
}

/// A device file brought back into SRC: the merger reads its chunks through
/// [`DevicePeer`].
struct Imported {
    /// The device file, as an entry for [`read_verified`].
    source: Entry,
    chunks: Vec<ChunkInfo>,
}

/// A change to what SRC records of the device.
#[derive(Debug, Clone)]
enum RecordChange {
    Set(DeviceRecord),
    Forget(String),
}

#[derive(Default)]
struct DevicePlan {
    dev: Vec<DevOp>,
    src: Vec<Action>,
    imports: HashMap<Hash, Imported>,
    /// Record changes that hold once the SRC action at that path is applied.
    after_src: Vec<(String, RecordChange)>,
    /// Record changes that hold now (found in sync).
    records: Vec<RecordChange>,
    conflicts: Vec<ConflictCopy>,
    warnings: Vec<String>,
    /// Paths left for the next round (a device file changed while read).
    deferred: usize,
}

impl DevicePlan {
    fn describe(&self, src_root: &Path, dev_root: &Path) -> Vec<PlannedAction> {
        let dev = self.dev.iter().map(|op| {
            let (op, path, line) = op.describe();
            PlannedAction {
                root: dev_root.to_path_buf(),
                op,
                path,
                line,
            }
        });
        let src = self.src.iter().map(|a| PlannedAction {
            root: src_root.to_path_buf(),
            op: a.op_name(),
            path: a.path().to_string(),
            line: a.describe(),
        });
        dev.chain(src).collect()
    }

    fn check_mass_delete(&self, src: &Folder, dev: &Folder, options: &SyncOptions) -> Result<()> {
        let src_deletes = self
            .src
            .iter()
            .filter(|a| {
                matches!(a.op, Op::Delete)
                    && a.current.as_ref().is_some_and(|c| c.kind != Kind::Dir)
            })
            .count();
        let dev_deletes = self
            .dev
            .iter()
            .filter(|op| matches!(op, DevOp::Remove { .. }))
            .count();
        for (root, deletes) in [(src.root(), src_deletes), (dev.root(), dev_deletes)] {
            if deletes == 0 {
                continue;
            }
            let files = count_files(root);
            if files >= options.mass_delete_min_files
                && deletes * 100 > files * options.mass_delete_percent as usize
            {
                return Err(Error::MassDelete {
                    root: root.to_path_buf(),
                    deletes,
                    files,
                    percent: options.mass_delete_percent,
                });
            }
        }
        Ok(())
    }
}

fn count_files(root: &Path) -> usize {
    scan::folder_walker(root, |_| {})
        .filter_map(|item| item.ok())
        .filter(|d| d.file_type().is_some_and(|t| !t.is_dir()))
        .count()
}

struct Planner {
    state: State,
    device: PeerId,
    one_way: bool,
    hasher: ContentHasher,
    plan: DevicePlan,
    /// Device files that stay, unchanged, by content: sources for copies.
    staying: HashMap<Hash, (String, Stamp)>,
    /// Conflict copy names taken in this plan.
    taken: HashSet<String>,
}

impl Planner {
    fn new(state: State, device: PeerId, one_way: bool) -> Self {
        Planner {
            state,
            device,
            one_way,
            hasher: ContentHasher::default(),
            plan: DevicePlan::default(),
            staying: HashMap::new(),
            taken: HashSet::new(),
        }
    }

    fn plan(mut self) -> Result<DevicePlan> {
        let keys: BTreeSet<String> = self
            .state
            .src
            .keys()
            .chain(self.state.dev.keys())
            .chain(self.state.records.keys())
            .cloned()
            .collect();
        for key in &keys {
            if self.state.is_skipped(key) {
                continue;
            }
            self.decide(key)?;
        }
        self.choose_sources();
        self.plan.dev.sort_by_key(DevOp::order);
        diff::sort_actions(&mut self.plan.src);
        self.plan.warnings.append(&mut self.state.warnings);
        Ok(self.plan)
    }

    fn decide(&mut self, key: &str) -> Result<()> {
        let src = self.state.src.get(key).cloned();
        let dev = self.state.dev.get(key).cloned();
        let record = self.state.records.get(key).cloned();
        let src_kind = src.as_ref().map(|e| match e.kind {
            Kind::Dir => DevKind::Dir,
            _ => DevKind::File,
        });
        if let (Some(s), Some(d)) = (src_kind, dev.as_ref().map(|d| d.kind))
            && s != d
        {
            let path = src.as_ref().map_or(key, |e| e.path.as_str());
            self.state.skip(
                key,
                format!(
                    "{path}: a {} here and a {} on the device; both left as they are",
                    if s == DevKind::Dir {
                        "directory"
                    } else {
                        "file"
                    },
                    if d == DevKind::Dir {
                        "directory"
                    } else {
                        "file"
                    },
                ),
            );
            return Ok(());
        }
        let target = self.state.dev_path(key);
        if let (Some(s), Some(d)) = (&src, &dev)
            && last_component(&s.path) != last_component(&d.path)
        {
            let parent = parent_key(key).map(|p| self.state.dev_path(p));
            let from = join(parent.as_deref().unwrap_or(""), last_component(&d.path));
            self.plan.dev.push(DevOp::CaseRename {
                from,
                to: target.clone(),
            });
        }
        match (src, dev) {
            (None, None) => {
                if record.is_some() {
                    self.plan
                        .records
                        .push(RecordChange::Forget(key.to_string()));
                }
            }
            (Some(s), d) if s.kind == Kind::Dir => {
                self.decide_dir(key, &target, Some(s), d, record)
            }
            (None, Some(d)) if d.kind == DevKind::Dir => {
                self.decide_dir(key, &target, None, Some(d), record)
            }
            (s, d) => self.decide_file(key, &target, s, d, record)?,
        }
        Ok(())
    }

    fn decide_dir(
        &mut self,
        key: &str,
        target: &str,
        src: Option<Entry>,
        dev: Option<DevItem>,
        record: Option<DeviceRecord>,
    ) {
        let recorded_dir = record.as_ref().is_some_and(|r| r.kind == Kind::Dir);
        let dir_record = DeviceRecord {
            key: key.to_string(),
            path: target.to_string(),
            kind: Kind::Dir,
            size: 0,
            mtime_ns: 0,
            hash: None,
        };
        match (src, dev) {
            (Some(_), Some(_)) => {
                if !recorded_dir {
                    self.plan.records.push(RecordChange::Set(dir_record));
                }
            }
            // Removed on the device: removed here too, unless SRC is the master.
            (Some(s), None) if recorded_dir && !self.one_way => self.delete_on_src(key, s),
            (Some(_), None) => self.plan.dev.push(DevOp::MakeDir {
                key: key.to_string(),
                path: target.to_string(),
            }),
            (None, Some(_)) if recorded_dir || self.one_way => {
                self.plan.dev.push(DevOp::RemoveDir {
                    key: key.to_string(),
                    path: target.to_string(),
                })
            }
            // Made on the device: made here too.
            (None, Some(_)) => {
                let entry = Entry {
                    kind: Kind::Dir,
                    mode: DEFAULT_DIR_MODE,
                    ..self.deletion(target)
                };
                self.plan.src.push(Action {
                    target: entry,
                    current: None,
                    op: Op::MakeDir,
                });
                self.plan
                    .after_src
                    .push((target.to_string(), RecordChange::Set(dir_record)));
            }
            (None, None) => {}
        }
    }

    fn decide_file(
        &mut self,
        key: &str,
        target: &str,
        src: Option<Entry>,
        dev: Option<DevItem>,
        record: Option<DeviceRecord>,
    ) -> Result<()> {
        let record = record.filter(|r| r.kind == Kind::File);
        let unchanged_on_device = |d: &DevItem| {
            record
                .as_ref()
                .is_some_and(|r| r.size == d.stamp.size && r.mtime_ns == d.stamp.mtime_ns)
        };
        match (src, dev) {
            (Some(s), Some(d)) => {
                if unchanged_on_device(&d) {
                    let recorded_hash = record.as_ref().and_then(|r| r.hash);
                    if recorded_hash == s.hash {
                        if let Some(hash) = s.hash {
                            self.staying.insert(hash, (target.to_string(), d.stamp));
                        }
                        if !mtimes_match(s.mtime_ns, d.stamp.mtime_ns) {
                            self.set_mtime(key, target, d.stamp, s);
                        }
                    } else {
                        let keep = !self.src_holds(recorded_hash);
                        self.write(key, target, s, Some((d.stamp, keep)));
                    }
                    return Ok(());
                }
                // Changed on the device, or never written by Latus.
                if record.is_none()
                    && d.stamp.size == s.size
                    && mtimes_match(d.stamp.mtime_ns, s.mtime_ns)
                {
                    let record = self.file_record(key, target, d.stamp, s.hash);
                    self.plan.records.push(RecordChange::Set(record));
                    return Ok(());
                }
                let Some(hashed) = self.hash_device_file(&d)? else {
                    return Ok(());
                };
                if Some(hashed.hash) == s.hash {
                    if mtimes_match(s.mtime_ns, d.stamp.mtime_ns) {
                        let record = self.file_record(key, target, d.stamp, s.hash);
                        self.plan.records.push(RecordChange::Set(record));
                    } else {
                        self.set_mtime(key, target, d.stamp, s);
                    }
                    return Ok(());
                }
                let src_unchanged = record.as_ref().is_some_and(|r| r.hash == s.hash);
                if self.one_way {
                    self.write(key, target, s, Some((d.stamp, true)));
                } else if src_unchanged {
                    self.import(key, target, Some(s), &d, hashed);
                } else {
                    self.conflict(key, target, s, &d, hashed);
                }
            }
            (Some(s), None) => match &record {
                // Deleted on the device, unchanged here: deleted here too.
                Some(r) if r.hash == s.hash && !self.one_way => self.delete_on_src(key, s),
                // New or changed here (an edit beats a deletion), or SRC is the master.
                _ => self.write(key, target, s, None),
            },
            (None, Some(d)) => {
                if unchanged_on_device(&d) {
                    let hash = record.as_ref().and_then(|r| r.hash);
                    self.plan.dev.push(DevOp::Remove {
                        key: key.to_string(),
                        path: target.to_string(),
                        expect: d.stamp,
                        keep: !self.src_holds(hash),
                        hash,
                    });
                } else if self.one_way {
                    self.plan.dev.push(DevOp::Remove {
                        key: key.to_string(),
                        path: target.to_string(),
                        expect: d.stamp,
                        keep: true,
                        hash: None,
                    });
                } else if let Some(hashed) = self.hash_device_file(&d)? {
                    self.import(key, target, None, &d, hashed);
                }
            }
            (None, None) => {}
        }
        Ok(())
    }

    fn src_holds(&self, hash: Option<Hash>) -> bool {
        hash.is_some_and(|h| self.state.src_contents.contains(&h))
    }

    fn write(&mut self, key: &str, target: &str, content: Entry, old: Option<(Stamp, bool)>) {
        self.plan.dev.push(DevOp::Write {
            key: key.to_string(),
            path: target.to_string(),
            content,
            old,
            source: Source::Src,
        });
    }

    fn set_mtime(&mut self, key: &str, target: &str, expect: Stamp, content: Entry) {
        self.plan.dev.push(DevOp::SetMtime {
            key: key.to_string(),
            path: target.to_string(),
            expect,
            content,
        });
    }

    fn file_record(&self, key: &str, path: &str, stamp: Stamp, hash: Option<Hash>) -> DeviceRecord {
        DeviceRecord {
            key: key.to_string(),
            path: path.to_string(),
            kind: Kind::File,
            size: stamp.size,
            mtime_ns: stamp.mtime_ns,
            hash,
        }
    }

    /// A version authored by the device now, at `path` of SRC (a deletion until
    /// the caller fills it in).
    fn deletion(&self, path: &str) -> Entry {
        Entry::authored(path.to_string(), Kind::Deleted, self.device, now_ns())
    }

    /// Deletes SRC's `current` at `key`: the device deleted it.
    fn delete_on_src(&mut self, key: &str, current: Entry) {
        self.plan.src.push(Action {
            target: self.deletion(&current.path),
            current: Some(current.clone()),
            op: Op::Delete,
        });
        self.plan
            .after_src
            .push((current.path, RecordChange::Forget(key.to_string())));
    }

    /// Brings the device file `dev` into SRC at `path` (over `current`).
    fn import(
        &mut self,
        key: &str,
        path: &str,
        current: Option<Entry>,
        dev: &DevItem,
        hashed: HashedContent,
    ) {
        let mode = current.as_ref().map_or(DEFAULT_FILE_MODE, |c| c.mode);
        let entry = Entry {
            kind: Kind::File,
            size: hashed.size,
            mtime_ns: dev.stamp.mtime_ns,
            mode,
            hash: Some(hashed.hash),
            ..self.deletion(path)
        };
        self.plan.imports.insert(
            hashed.hash,
            Imported {
                source: Entry {
                    path: dev.path.clone(),
                    ..entry.clone()
                },
                chunks: hashed.chunks,
            },
        );
        self.plan.src.push(Action {
            target: entry,
            current,
            op: Op::Replace,
        });
        let record = self.file_record(key, &dev.path, dev.stamp, Some(hashed.hash));
        self.plan
            .after_src
            .push((path.to_string(), RecordChange::Set(record)));
    }

    /// Both sides changed the file: both versions are kept. The later mtime keeps
    /// the name (then SRC); the other becomes a conflict copy on both sides.
    fn conflict(
        &mut self,
        key: &str,
        target: &str,
        src: Entry,
        dev: &DevItem,
        hashed: HashedContent,
    ) {
        let device_wins = dev.stamp.mtime_ns > src.mtime_ns;
        if device_wins {
            let copy_path = self.free_conflict_name(target, &src);
            self.plan.src.push(Action {
                target: src.clone(),
                current: Some(src.clone()),
                op: Op::ConflictCopy {
                    copy_path: copy_path.clone(),
                },
            });
            self.import(key, &src.path, None, dev, hashed);
            self.plan.dev.push(DevOp::Write {
                key: fold(&copy_path),
                path: copy_path.clone(),
                content: src.clone(),
                old: None,
                source: Source::Src,
            });
            self.plan.conflicts.push(ConflictCopy {
                path: src.path,
                copy_path,
            });
            return;
        }
        let loser = Entry {
            hash: Some(hashed.hash),
            ..self.deletion(target)
        };
        let copy_path = self.free_conflict_name(target, &loser);
        let moved = DevItem {
            path: copy_path.clone(),
            ..dev.clone()
        };
        let record = self.file_record(&fold(&copy_path), &copy_path, dev.stamp, Some(hashed.hash));
        self.plan.dev.push(DevOp::SetAside {
            from: target.to_string(),
            to: copy_path.clone(),
            expect: dev.stamp,
            record,
        });
        self.write(key, target, src.clone(), None);
        // The set-aside device file is read back into SRC under its new name.
        self.import(&fold(&copy_path), &copy_path, None, &moved, hashed);
        self.plan.conflicts.push(ConflictCopy {
            path: src.path,
            copy_path,
        });
    }

    fn free_conflict_name(&mut self, path: &str, loser: &Entry) -> String {
        let name = diff::conflict_name(path, loser);
        let mut candidate = name.clone();
        let mut counter = 2;
        while self.state.src.contains_key(&fold(&candidate))
            || self.state.dev.contains_key(&fold(&candidate))
            || !self.taken.insert(fold(&candidate))
        {
            candidate = format!("{name}-{counter}");
            counter += 1;
        }
        candidate
    }

    /// Hashes a device file that changed (or was never written by Latus); `None`
    /// (with a warning) when it changes while read: it waits for the next round.
    fn hash_device_file(&mut self, item: &DevItem) -> Result<Option<HashedContent>> {
        let path = self.state.dev_root.join(&item.path);
        let mut file = match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if is_gone(&e) => {
                self.plan.deferred += 1;
                return Ok(None);
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let stamp_of = |file: &File| -> Result<Stamp> {
            let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
            Ok(Stamp {
                size: meta.size(),
                mtime_ns: mtime_of(&meta),
            })
        };
        if stamp_of(&file)? != item.stamp {
            self.plan.deferred += 1;
            return Ok(None);
        }
        let hashed = self
            .hasher
            .hash_reader(&mut (&mut file).take(item.stamp.size + 1), |_| {})
            .map_err(|e| Error::io(&path, e))?;
        if hashed.size != item.stamp.size || stamp_of(&file)? != item.stamp {
            self.plan.warnings.push(format!(
                "{} on the device changed while read; retried",
                item.path
            ));
            self.plan.deferred += 1;
            return Ok(None);
        }
        Ok(Some(hashed))
    }

    /// A file SRC moved is renamed on the device, a file SRC copied is copied
    /// within the device: its bytes do not cross from SRC again.
    fn choose_sources(&mut self) {
        let mut movable: HashMap<Hash, Vec<usize>> = HashMap::new();
        for (index, op) in self.plan.dev.iter().enumerate() {
            if let DevOp::Remove {
                hash: Some(hash), ..
            } = op
            {
                movable.entry(*hash).or_default().push(index);
            }
        }
        let mut moved = HashSet::new();
        for index in 0..self.plan.dev.len() {
            let DevOp::Write {
                content,
                source: Source::Src,
                ..
            } = &self.plan.dev[index]
            else {
                continue;
            };
            let Some(hash) = content.hash else {
                continue;
            };
            let source = if let Some(from) = movable.get_mut(&hash).and_then(Vec::pop) {
                moved.insert(from);
                match &self.plan.dev[from] {
                    DevOp::Remove {
                        key, path, expect, ..
                    } => Source::Move {
                        key: key.clone(),
                        path: path.clone(),
                        expect: *expect,
                    },
                    _ => continue,
                }
            } else if let Some((path, expect)) = self.staying.get(&hash) {
                Source::Copy {
                    path: path.clone(),
                    expect: *expect,
                }
            } else {
                continue;
            };
            if let DevOp::Write { source: slot, .. } = &mut self.plan.dev[index] {
                *slot = source;
            }
        }
        let mut index = 0;
        self.plan.dev.retain(|_| {
            index += 1;
            !moved.contains(&(index - 1))
        });
    }
}

/// Serves the device files being brought back, to SRC's merger.
struct DevicePeer {
    root: PathBuf,
    id: PeerId,
    imports: HashMap<Hash, Imported>,
}

impl Peer for DevicePeer {
    fn id(&self) -> PeerId {
        self.id
    }

    fn changes_since(&self, _seq: u64, _limit: usize) -> Result<Vec<Entry>> {
        Ok(Vec::new())
    }

    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        Ok(self
            .imports
            .get(content)
            .map(|i| i.chunks.clone())
            .unwrap_or_default())
    }

    fn read_chunk(
        &self,
        _path: &str,
        content: &Hash,
        chunk: &ChunkInfo,
    ) -> Result<Option<Vec<u8>>> {
        let Some(imported) = self.imports.get(content) else {
            return Ok(None);
        };
        read_verified(&self.root, &imported.source, chunk.offset, chunk)
    }
}

/// Runs the device steps, then SRC's, and records what the device now holds.
fn apply(
    src: &Folder,
    dev: &Folder,
    store: &mut HistoryStore,
    device: PeerId,
    plan: DevicePlan,
    options: &SyncOptions,
    report: &mut SyncReport,
) -> Result<()> {
    let mut writer = DeviceWriter {
        src_root: src.root().to_path_buf(),
        dev_root: dev.root().to_path_buf(),
        tmp: dev.marker_dir().join(TMP_DIR),
        trash: Trash::new(dev),
        changes: plan.records,
        tmp_counter: 0,
    };
    for (done, op) in plan.dev.iter().enumerate() {
        if options.merge.interrupt_after.is_some_and(|n| done >= n) {
            report.interrupted = true;
            break;
        }
        match writer.run(op, &mut report.b) {
            Ok(true) => report.b.applied += 1,
            Ok(false) => {}
            // A full device: stop, keeping the record of what was written.
            Err(e) if is_disk_full(&e) => {
                save_records(store, &device, dev, writer.changes)?;
                return Err(e);
            }
            Err(e) => {
                let (_, _, line) = op.describe();
                tracing::warn!("{line}: {e}");
                report.warnings.push(format!("{line}: {e}"));
            }
        }
    }
    let mut changes = writer.changes;
    if !report.interrupted && !plan.src.is_empty() {
        let peer = DevicePeer {
            root: dev.root().to_path_buf(),
            id: device,
            imports: plan.imports,
        };
        let src_plan = Plan {
            actions: plan.src,
            warnings: Vec::new(),
        };
        let merged = merge::apply(src, store, &peer, src_plan, &options.merge)?;
        let deferred: HashSet<&str> = merged.deferred.iter().map(String::as_str).collect();
        changes.extend(
            plan.after_src
                .into_iter()
                .filter(|(path, _)| !deferred.contains(path.as_str()))
                .map(|(_, change)| change),
        );
        report.a.applied += merged.applied;
        report.a.bytes_local += merged.bytes_local;
        report.a.bytes_fetched += merged.bytes_fetched;
        report.warnings.extend(merged.warnings);
        report.interrupted |= merged.interrupted;
    }
    report.conflicts.extend(plan.conflicts);
    save_records(store, &device, dev, changes)
}

fn is_disk_full(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
        Error::DiskFull(_) => true,
        _ => false,
    }
}

/// Stores what the device now holds; for a key changed twice, the later change counts.
fn save_records(
    store: &mut HistoryStore,
    device: &PeerId,
    dev: &Folder,
    changes: Vec<RecordChange>,
) -> Result<()> {
    let mut last: HashMap<String, Option<DeviceRecord>> = HashMap::new();
    for change in changes {
        match change {
            RecordChange::Set(record) => last.insert(record.key.clone(), Some(record)),
            RecordChange::Forget(key) => last.insert(key, None),
        };
    }
    let (set, forget): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, r)| r.is_some());
    let upserts: Vec<DeviceRecord> = set.into_iter().filter_map(|(_, r)| r).collect();
    let removals: Vec<String> = forget.into_iter().map(|(key, _)| key).collect();
    let root = dev.root().to_string_lossy();
    store.update_device_records(device, &root, &upserts, &removals)
}

/// Carries out device steps. Before touching a device file it checks the file
/// still has the size and mtime the plan saw: a change made meanwhile is never
/// overwritten (the step waits for the next round).
struct DeviceWriter {
    src_root: PathBuf,
    dev_root: PathBuf,
    tmp: PathBuf,
    trash: Trash,
    /// Record changes of the steps done, in order.
    changes: Vec<RecordChange>,
    tmp_counter: u64,
}

impl DeviceWriter {
    /// `Ok(false)`: the step waits for the next round.
    fn run(&mut self, op: &DevOp, side: &mut SideReport) -> Result<bool> {
        match op {
            DevOp::CaseRename { from, to } => {
                check_relative(from)?;
                check_relative(to)?;
                // Through a temporary name: on a case-insensitive file system a
                // direct rename may be refused or do nothing.
                let temp = self.temp_path();
                fs::rename(self.dev_root.join(from), &temp)
                    .map_err(|e| Error::io(self.dev_root.join(from), e))?;
                if !rename_no_replace(&temp, &self.dev_root.join(to))? {
                    fs::rename(&temp, self.dev_root.join(from))
                        .map_err(|e| Error::io(self.dev_root.join(from), e))?;
                    return Ok(false);
                }
                Ok(true)
            }
            DevOp::SetAside {
                from,
                to,
                expect,
                record,
            } => {
                check_relative(to)?;
                if !self.matches(from, *expect)? {
                    return Ok(false);
                }
                if !rename_no_replace(&self.dev_root.join(from), &self.dev_root.join(to))? {
                    return Ok(false);
                }
                self.changes.push(RecordChange::Set(record.clone()));
                Ok(true)
            }
            DevOp::Remove {
                key,
                path,
                expect,
                keep,
                ..
            } => {
                if !self.matches(path, *expect)? {
                    return Ok(false);
                }
                self.discard(path, *keep)?;
                self.changes.push(RecordChange::Forget(key.clone()));
                Ok(true)
            }
            DevOp::MakeDir { key, path } => {
                check_relative(path)?;
                prepare_parent(&self.dev_root, path)?;
                let abs = self.dev_root.join(path);
                match fs::create_dir(&abs) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && abs.is_dir() => {}
                    Err(e) => return Err(Error::io(&abs, e)),
                }
                self.changes.push(RecordChange::Set(DeviceRecord {
                    key: key.clone(),
                    path: path.clone(),
                    kind: Kind::Dir,
                    size: 0,
                    mtime_ns: 0,
                    hash: None,
                }));
                Ok(true)
            }
            DevOp::Write {
                key,
                path,
                content,
                old,
                source,
            } => self.write(key, path, content, *old, source, side),
            DevOp::SetMtime {
                key,
                path,
                expect,
                content,
            } => {
                if !self.matches(path, *expect)? {
                    return Ok(false);
                }
                let abs = self.dev_root.join(path);
                set_mtime(&abs, content.mtime_ns)?;
                self.record_file(key, path, content)?;
                Ok(true)
            }
            DevOp::RemoveDir { key, path } => {
                check_relative(path)?;
                let abs = self.dev_root.join(path);
                match fs::remove_dir(&abs) {
                    Ok(()) => {}
                    Err(e) if is_gone(&e) => {}
                    // Something not synced is still in it: it stays, and comes
                    // back to SRC as a directory of its own.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                    Err(e) => return Err(Error::io(&abs, e)),
                }
                self.changes.push(RecordChange::Forget(key.clone()));
                Ok(true)
            }
        }
    }

    fn write(
        &mut self,
        key: &str,
        path: &str,
        content: &Entry,
        old: Option<(Stamp, bool)>,
        source: &Source,
        side: &mut SideReport,
    ) -> Result<bool> {
        check_relative(path)?;
        prepare_parent(&self.dev_root, path)?;
        let abs = self.dev_root.join(path);
        if let Source::Move {
            key: from_key,
            path: from,
            expect,
        } = source
            && self.matches(from, *expect)?
        {
            if let Some((stamp, keep)) = old {
                if !self.matches(path, stamp)? {
                    return Ok(false);
                }
                self.discard(path, keep)?;
            }
            if !rename_no_replace(&self.dev_root.join(from), &abs)? {
                return Ok(false);
            }
            set_mtime(&abs, content.mtime_ns)?;
            self.changes.push(RecordChange::Forget(from_key.clone()));
            self.record_file(key, path, content)?;
            return Ok(true);
        }
        let temp = self.temp_path();
        let built = match source {
            Source::Copy { path: from, expect } => {
                match self.copy(&self.dev_root.join(from), Some(*expect), content, &temp)? {
                    Some(bytes) => {
                        side.bytes_local += bytes;
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        };
        if !built {
            let from = self.src_root.join(&content.path);
            match self.copy(&from, None, content, &temp)? {
                Some(bytes) => side.bytes_fetched += bytes,
                None => {
                    let _ = fs::remove_file(&temp);
                    return Ok(false);
                }
            }
        }
        set_mtime(&temp, content.mtime_ns)?;
        let placed = match old {
            None => rename_no_replace(&temp, &abs)?,
            Some((stamp, keep)) => {
                if self.matches(path, stamp)? {
                    if keep {
                        self.keep_in_trash(path)?;
                    }
                    fs::rename(&temp, &abs).map_err(|e| Error::io(&abs, e))?;
                    true
                } else {
                    false
                }
            }
        };
        if !placed {
            let _ = fs::remove_file(&temp);
            return Ok(false);
        }
        self.record_file(key, path, content)?;
        Ok(true)
    }

    /// Copies `from` (SRC's file `content`, or a device file with `expect`ed
    /// stamp) to `temp`, checking it is still that content. `None`: it is not.
    fn copy(
        &self,
        from: &Path,
        expect: Option<Stamp>,
        content: &Entry,
        temp: &Path,
    ) -> Result<Option<u64>> {
        let expect = expect.unwrap_or(Stamp {
            size: content.size,
            mtime_ns: content.mtime_ns,
        });
        let mut input = match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(from)
        {
            Ok(file) => file,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(Error::io(from, e)),
        };
        let meta = input.metadata().map_err(|e| Error::io(from, e))?;
        if !meta.is_file() || meta.size() != expect.size || mtime_of(&meta) != expect.mtime_ns {
            return Ok(None);
        }
        let mut output = File::options()
            .write(true)
            .create_new(true)
            .open(temp)
            .map_err(|e| Error::io(temp, e))?;
        let (copied, hash) = merge::copy_hashing(&mut input, from, &mut output, temp)?;
        if copied != content.size || Some(hash) != content.hash {
            return Ok(None);
        }
        Ok(Some(copied))
    }

    /// Whether the device file at `path` still has the stamp the plan saw.
    fn matches(&self, path: &str, expect: Stamp) -> Result<bool> {
        check_relative(path)?;
        let abs = self.dev_root.join(path);
        match fs::symlink_metadata(&abs) {
            Ok(meta) => Ok(meta.is_file()
                && meta.size() == expect.size
                && mtime_of(&meta) == expect.mtime_ns),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(Error::io(&abs, e)),
        }
    }

    fn discard(&mut self, path: &str, keep: bool) -> Result<()> {
        if keep {
            return self.trash.take(&self.dev_root, path);
        }
        let abs = self.dev_root.join(path);
        fs::remove_file(&abs).map_err(|e| Error::io(&abs, e))
    }

    /// Keeps the file at `path` in the trash before a new version is renamed over
    /// it: a hard link keeps the replacement atomic; file systems without hard
    /// links (FAT) get a move, which leaves the path empty for a moment.
    fn keep_in_trash(&mut self, path: &str) -> Result<()> {
        match self.trash.keep(&self.dev_root, path) {
            Ok(()) => Ok(()),
            Err(_) => self.trash.take(&self.dev_root, path),
        }
    }

    fn record_file(&mut self, key: &str, path: &str, content: &Entry) -> Result<()> {
        let abs = self.dev_root.join(path);
        let meta = fs::symlink_metadata(&abs).map_err(|e| Error::io(&abs, e))?;
        self.changes.push(RecordChange::Set(DeviceRecord {
            key: key.to_string(),
            path: path.to_string(),
            kind: Kind::File,
            size: meta.size(),
            mtime_ns: mtime_of(&meta),
            hash: content.hash,
        }));
        Ok(())
    }

    fn temp_path(&mut self) -> PathBuf {
        self.tmp_counter += 1;
        self.tmp
            .join(format!("{}-{}", std::process::id(), self.tmp_counter))
    }
}
