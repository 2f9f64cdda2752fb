//! The scanner against real directories: what it records, what it re-reads, and
//! how it treats files that change, vanish, or cannot be read.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{backdate, bytes, content_hash, current, disk_state, recorded_state, write};
use latus::content::{ChunkInfo, Hash};
use latus::device::PeerId;
use latus::folder::Folder;
use latus::history::{HistoryStore, Kind};
use latus::peer::{FolderPeer, Peer};
use latus::scan::{ScanObserver, ScanOptions, ScanSummary, scan};

const DEVICE: PeerId = PeerId([1; 32]);

struct Fixture {
    dir: tempfile::TempDir,
    folder: Folder,
    store: HistoryStore,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open_or_create(dir.path()).unwrap();
        let store = HistoryStore::open(&folder.history_path()).unwrap();
        Fixture { dir, folder, store }
    }

    fn root(&self) -> &Path {
        self.folder.root()
    }

    fn scan(&mut self) -> ScanSummary {
        self.scan_with(ScanOptions::default())
    }

    fn scan_with(&mut self, options: ScanOptions) -> ScanSummary {
        scan(&self.folder, &mut self.store, DEVICE, &options).unwrap()
    }

    fn assert_history_matches_disk(&self) {
        assert_eq!(recorded_state(&self.store), disk_state(self.root()));
    }
}

/// Calls a closure for every read made while hashing.
struct OnRead<F>(F);

impl<F: Fn(&str, u64) + Send + Sync> ScanObserver for OnRead<F> {
    fn bytes_read(&self, path: &str, bytes: u64) {
        (self.0)(path, bytes)
    }
}

fn with_observer(observer: impl ScanObserver + 'static) -> ScanOptions {
    ScanOptions {
        observer: Some(Arc::new(observer)),
        ..ScanOptions::default()
    }
}

#[test]
fn first_scan_records_every_entry_exactly() {
    let mut fx = Fixture::new();
    let big = bytes(3 << 20, 1);
    write(fx.root(), "a.txt", b"hello");
    write(fx.root(), "empty", b"");
    write(fx.root(), "dir/sub/big.bin", &big);
    symlink("a.txt", fx.root().join("link")).unwrap();
    fs::set_permissions(fx.root().join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();

    let s = fx.scan();
    assert_eq!((s.files, s.dirs, s.symlinks), (3, 2, 1));
    assert_eq!(
        (s.new, s.changed, s.deleted, s.unchanged, s.skipped),
        (6, 0, 0, 0, 0)
    );
    assert_eq!(s.bytes_hashed, 5 + big.len() as u64);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    fx.assert_history_matches_disk();

    let entries = current(&fx.store);
    let a = &entries["a.txt"];
    assert_eq!((a.kind, a.size, a.mode), (Kind::File, 5, 0o600));
    assert_eq!((a.peerid, a.author_peerid), (DEVICE, DEVICE));
    let meta = fs::metadata(fx.root().join("a.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(a.mtime_ns, meta.mtime() * 1_000_000_000 + meta.mtime_nsec());
    assert_eq!(entries["link"].link_target.as_deref(), Some("a.txt"));
    assert_eq!(entries["dir/sub"].kind, Kind::Dir);

    // The big file's chunk list covers it, within the chunk bounds.
    let chunks = fx.store.chunks_of(&content_hash(&big)).unwrap();
    assert!(chunks.len() >= 12, "{} chunks", chunks.len());
    assert_eq!(
        chunks.iter().map(|c| c.len as u64).sum::<u64>(),
        big.len() as u64
    );
    for c in &chunks {
        let range = c.offset as usize..c.offset as usize + c.len as usize;
        assert_eq!(c.hash, Hash::of(&big[range]));
    }
    assert_eq!(
        fx.store.latests_by_hash(&Hash::of(b"hello")).unwrap()[0].path,
        "a.txt"
    );
    // A one-chunk file is its own chunk; an empty file has none.
    let one = latus::content::ChunkInfo {
        hash: Hash::of(b"hello"),
        offset: 0,
        len: 5,
    };
    assert_eq!(fx.store.chunks_of(&Hash::of(b"hello")).unwrap(), vec![one]);
    assert!(fx.store.chunks_of(&Hash::of(b"")).unwrap().is_empty());
    assert_eq!(s.last_seq, 6);
}

#[test]
fn rescans_record_exactly_the_changes() {
    let mut fx = Fixture::new();
    for i in 0..10 {
        write(
            fx.root(),
            &format!("d/f{i}"),
            format!("file {i}").as_bytes(),
        );
    }
    backdate(fx.root());
    fx.scan();
    let before = current(&fx.store);

    write(fx.root(), "d/f0", b"edited, longer than before");
    fs::remove_file(fx.root().join("d/f1")).unwrap();
    fs::rename(fx.root().join("d/f2"), fx.root().join("d/renamed")).unwrap();
    write(fx.root(), "d/new", b"brand new");
    fs::set_permissions(fx.root().join("d/f3"), fs::Permissions::from_mode(0o755)).unwrap();

    let s = fx.scan();
    // new: d/new, d/renamed; changed: d/f0 (content), d/f3 (mode); deleted: d/f1, d/f2.
    assert_eq!((s.new, s.changed, s.deleted), (2, 2, 2));
    // Unchanged: 6 files and the directory; only the 4 touched files were read.
    assert_eq!((s.unchanged, s.files_hashed), (7, 4));
    fx.assert_history_matches_disk();

    let history = fx.store.history("d/f0").unwrap();
    assert_eq!(history.len(), 2, "both versions are kept");
    assert_eq!(history[1], before["d/f0"]);
    assert_eq!(
        fx.store.latest_by_path("d/f1").unwrap().unwrap().kind,
        Kind::Deleted
    );
    assert_eq!(current(&fx.store)["d/f3"].mode, 0o755);

    // d/f0 and d/new were written just now, so they are read once more; the
    // renamed and chmod-ed files kept old mtimes and are trusted.
    let again = fx.scan();
    assert_eq!(
        (again.new, again.changed, again.deleted, again.files_hashed),
        (0, 0, 0, 2)
    );
}

#[test]
fn a_targeted_scan_records_the_changes_at_its_paths_and_nothing_else() {
    let mut fx = Fixture::new();
    for rel in [
        "a/x", "a/gone", "a/deep/y", "b/y", "b/z", "top", "a.txt", "ab/x",
    ] {
        write(fx.root(), rel, rel.as_bytes());
    }
    backdate(fx.root());
    fx.scan();
    let only = |paths: &[&str]| ScanOptions {
        only: Some(paths.iter().map(|p| p.to_string()).collect()),
        ..ScanOptions::default()
    };

    write(fx.root(), "a/x", b"edited");
    fs::remove_file(fx.root().join("a/gone")).unwrap();
    write(fx.root(), "a/deep/new", b"new");
    write(fx.root(), "b/y", b"edited outside the scan");
    write(fx.root(), "top", b"edited outside the scan too");
    // Names that start like the target but are not under it.
    fs::remove_file(fx.root().join("a.txt")).unwrap();
    fs::remove_file(fx.root().join("ab/x")).unwrap();
    let s = fx.scan_with(only(&["a"]));
    assert_eq!((s.new, s.changed, s.deleted), (1, 1, 1), "{s:?}");
    // Only what is under a/ was looked at: b/ and top were not even walked.
    assert_eq!(
        s.files + s.dirs,
        5,
        "a, a/x, a/deep, a/deep/y, a/deep/new: {s:?}"
    );
    let now = current(&fx.store);
    assert_eq!(now["b/y"].size, 3, "b/y is still recorded as it was");
    assert!(now.contains_key("a/deep/new") && !now.contains_key("a/gone"));
    assert!(now.contains_key("a.txt") && now.contains_key("ab/x"));

    // A file, and a directory that no longer exists: its entries are deleted.
    fs::remove_dir_all(fx.root().join("a/deep")).unwrap();
    let s = fx.scan_with(only(&["b/y", "a/deep"]));
    assert_eq!((s.new, s.changed, s.deleted), (0, 1, 3), "{s:?}");
    // Nothing named: nothing looked at.
    let s = fx.scan_with(only(&[]));
    assert_eq!(
        (s.files, s.dirs, s.new, s.changed, s.deleted),
        (0, 0, 0, 0, 0)
    );
    // The whole folder again: only top, a.txt and ab/x were left to record.
    let s = fx.scan();
    assert_eq!((s.new, s.changed, s.deleted), (0, 1, 2), "{s:?}");
    fx.assert_history_matches_disk();
}

#[test]
fn unchanged_files_are_not_read_again() {
    let mut fx = Fixture::new();
    for i in 0..50 {
        write(fx.root(), &format!("f{i}"), &bytes(10_000, i));
    }
    backdate(fx.root());
    fx.scan();
    let reads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&reads);
    let s = fx.scan_with(with_observer(OnRead(move |_: &str, n| {
        counter.fetch_add(n, Ordering::Relaxed);
    })));
    assert_eq!(reads.load(Ordering::Relaxed), 0);
    assert_eq!((s.files_hashed, s.bytes_hashed, s.unchanged), (0, 0, 50));
}

#[test]
fn a_file_replaced_by_an_identical_copy_is_refreshed_not_versioned() {
    let mut fx = Fixture::new();
    write(fx.root(), "f", b"same bytes");
    backdate(fx.root());
    fx.scan();
    let seq = fx.store.last_seq().unwrap();
    // Same content and mtime, new inode: a restore from backup, an editor's safe save.
    let original = fx.root().join("f");
    let mtime = fs::metadata(&original).unwrap().modified().unwrap();
    let copy = fx.root().join("f.tmp");
    fs::copy(&original, &copy).unwrap();
    fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::rename(&copy, &original).unwrap();

    let s = fx.scan();
    assert_eq!(
        (s.files_hashed, s.new, s.changed, s.unchanged),
        (1, 0, 0, 1)
    );
    assert_eq!(fx.store.last_seq().unwrap(), seq, "no new version");
    assert_eq!(
        fx.scan().files_hashed,
        0,
        "the refreshed stat is remembered"
    );
}

#[test]
fn recently_modified_files_are_read_again_until_their_stat_can_be_trusted() {
    let mut fx = Fixture::new();
    write(fx.root(), "old", b"settled long ago");
    backdate(fx.root());
    write(fx.root(), "fresh", b"just written");
    fx.scan();
    let seq = fx.store.last_seq().unwrap();
    // "fresh" could still change within its mtime tick without its stat moving.
    let s = fx.scan();
    assert_eq!((s.files_hashed, s.changed, s.unchanged), (1, 0, 2));
    assert_eq!(
        fx.store.last_seq().unwrap(),
        seq,
        "re-reading adds no version"
    );
}

#[test]
fn type_changes_are_recorded() {
    let mut fx = Fixture::new();
    write(fx.root(), "was_file", b"x");
    write(fx.root(), "was_dir/inner", b"y");
    write(fx.root(), "was_link_target", b"z");
    symlink("was_link_target", fx.root().join("was_link")).unwrap();
    fx.scan();

    fs::remove_file(fx.root().join("was_file")).unwrap();
    fs::create_dir(fx.root().join("was_file")).unwrap();
    fs::remove_dir_all(fx.root().join("was_dir")).unwrap();
    write(fx.root(), "was_dir", b"now a file");
    fs::remove_file(fx.root().join("was_link")).unwrap();
    write(fx.root(), "was_link", b"now a file too");

    let s = fx.scan();
    assert_eq!((s.changed, s.deleted), (3, 1), "was_dir/inner is deleted");
    fx.assert_history_matches_disk();
}

#[test]
fn ignore_rules_apply_and_ignored_paths_keep_their_history() {
    let mut fx = Fixture::new();
    write(fx.root(), "keep.txt", b"k");
    write(fx.root(), "later-ignored.log", b"l");
    write(fx.root(), "sub/notes.md", b"n");
    write(fx.root(), "sub/cache/blob", b"c");
    fx.scan();
    assert!(current(&fx.store).contains_key("later-ignored.log"));

    write(fx.root(), ".latusignore", b"*.log\n");
    write(fx.root(), "sub/.latusignore", b"cache/\n!important.log\n");
    write(fx.root(), "new.log", b"ignored from the start");
    write(fx.root(), "sub/important.log", b"re-included below sub/");
    write(fx.root(), "sub/cache/other", b"ignored");
    let s = fx.scan();
    assert_eq!(
        s.deleted,
        0,
        "ignored paths are not deletions: {:?}",
        current(&fx.store).keys()
    );
    let entries = current(&fx.store);
    assert!(entries.contains_key("later-ignored.log"));
    assert!(entries.contains_key(".latusignore"));
    assert!(entries.contains_key("sub/important.log"));
    assert!(!entries.contains_key("new.log"));
    assert!(!entries.contains_key("sub/cache/other"));
    assert!(!entries.keys().any(|p| p.starts_with(".latus/")));
}

#[test]
fn a_directory_replaced_by_a_symlink_deletes_what_it_held() {
    let mut fx = Fixture::new();
    write(fx.root(), "d/a", b"in d");
    write(fx.root(), "elsewhere/a", b"a file with the same name");
    fx.scan();
    fs::remove_dir_all(fx.root().join("d")).unwrap();
    symlink("elsewhere", fx.root().join("d")).unwrap();
    let s = fx.scan();
    // d/a is gone even though the path now resolves, through the link, to a file.
    assert_eq!((s.deleted, s.changed), (1, 1));
    fx.assert_history_matches_disk();
}

#[test]
fn symlinks_are_recorded_not_followed() {
    let mut fx = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret/deep.txt", b"outside the folder");
    symlink(outside.path(), fx.root().join("to_outside")).unwrap();
    symlink("loop", fx.root().join("loop")).unwrap();
    symlink("missing/target", fx.root().join("dangling")).unwrap();
    let s = fx.scan();
    assert_eq!((s.symlinks, s.files, s.skipped), (3, 0, 0));
    let entries = current(&fx.store);
    assert_eq!(entries.len(), 3, "{:?}", entries.keys());
    assert_eq!(
        entries["to_outside"].link_target.as_deref(),
        outside.path().to_str()
    );

    // Retargeting a link is a change.
    fs::remove_file(fx.root().join("dangling")).unwrap();
    symlink("elsewhere", fx.root().join("dangling")).unwrap();
    assert_eq!(fx.scan().changed, 1);
}

#[test]
fn a_file_modified_while_hashed_is_read_again() {
    let mut fx = Fixture::new();
    let path = fx.root().join("growing.bin");
    fs::write(&path, bytes(3 << 20, 2)).unwrap();
    let final_content = bytes(4 << 20, 3);
    let done = AtomicBool::new(false);
    let (target, replacement) = (path.clone(), final_content.clone());
    let s = fx.scan_with(with_observer(OnRead(move |p: &str, _| {
        if p == "growing.bin" && !done.swap(true, Ordering::SeqCst) {
            fs::write(&target, &replacement).unwrap();
        }
    })));
    assert_eq!((s.new, s.skipped), (1, 0), "{:?}", s.warnings);
    let entry = fx.store.latest_by_path("growing.bin").unwrap().unwrap();
    assert_eq!(entry.hash, Some(content_hash(&final_content)));
    assert_eq!(entry.size, final_content.len() as u64);
    assert!(s.bytes_hashed > final_content.len() as u64, "read twice");
}

#[test]
fn a_file_that_keeps_changing_is_skipped_and_keeps_its_history() {
    let mut fx = Fixture::new();
    let path = fx.root().join("log.txt");
    fs::write(&path, b"first version").unwrap();
    fx.scan();
    let recorded = fx.store.latest_by_path("log.txt").unwrap().unwrap();

    fs::write(&path, bytes(2 << 20, 4)).unwrap();
    let target = path.clone();
    let s = fx.scan_with(with_observer(OnRead(move |_: &str, _| {
        let mut f = fs::File::options().append(true).open(&target).unwrap();
        std::io::Write::write_all(&mut f, b"more").unwrap();
    })));
    assert_eq!((s.skipped, s.changed), (1, 0));
    assert!(
        s.warnings[0].starts_with("log.txt: changed while being read"),
        "{:?}",
        s.warnings
    );
    assert_eq!(
        fx.store.latest_by_path("log.txt").unwrap().unwrap(),
        recorded
    );
    // Once it settles, the next scan records it.
    assert_eq!(fx.scan().changed, 1);
    fx.assert_history_matches_disk();
}

#[test]
fn batches_are_committed_while_the_scan_runs() {
    let mut fx = Fixture::new();
    for i in 0..2500 {
        write(fx.root(), &format!("f{i:04}"), format!("{i}").as_bytes());
    }
    let db = fx.folder.history_path();
    let files_started = AtomicUsize::new(0);
    let seen_mid_scan = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&seen_mid_scan);
    let options = ScanOptions {
        hash_threads: 1,
        ..with_observer(OnRead(move |_: &str, _| {
            if files_started.fetch_add(1, Ordering::SeqCst) != 2200 {
                return;
            }
            // 2,200 files are hashed: at least two batches of 1,000 must be readable
            // by another connection now, before the scan ends.
            let reader = HistoryStore::open_read_only(&db).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut committed = reader.last_seq().unwrap();
            while committed < 2000 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                committed = reader.last_seq().unwrap();
            }
            *seen.lock().unwrap() = Some(committed);
        }))
    };
    let s = fx.scan_with(options);
    assert_eq!(s.new, 2500);
    let committed = seen_mid_scan.lock().unwrap().expect("observer ran");
    assert!(
        (2000..2500).contains(&committed),
        "saw {committed} entries mid-scan"
    );
}

#[test]
fn an_unreadable_directory_keeps_its_history() {
    if running_as_root() {
        // Root reads anything; tests/cli.rs covers this case with privileges dropped.
        return;
    }
    let mut fx = Fixture::new();
    write(fx.root(), "locked/a", b"a");
    fx.scan();
    let locked = fx.root().join("locked");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let s = fx.scan();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!((s.deleted, s.skipped), (0, 1), "{:?}", s.warnings);
    assert!(current(&fx.store).contains_key("locked/a"));
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn names_that_are_not_utf8_are_refused_with_a_warning() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut fx = Fixture::new();
    let name = OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(fx.root().join(name), b"latin-1 name").unwrap();
    write(fx.root(), "ok.txt", b"fine");
    let s = fx.scan();
    assert_eq!((s.new, s.files), (1, 1));
    assert_eq!(s.warnings.len(), 1);
    assert!(
        s.warnings[0].contains("not valid UTF-8"),
        "{:?}",
        s.warnings
    );
    assert_eq!(current(&fx.store).keys().collect::<Vec<_>>(), ["ok.txt"]);
}

#[test]
fn fifos_are_skipped_with_a_warning_without_blocking() {
    let mut fx = Fixture::new();
    let fifo = std::ffi::CString::new(fx.root().join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    write(fx.root(), "file", b"f");
    let s = fx.scan();
    assert_eq!((s.new, s.skipped), (1, 1));
    assert!(
        s.warnings[0].starts_with("pipe: not a regular file"),
        "{:?}",
        s.warnings
    );
}

#[test]
fn nested_latus_directories_are_never_recorded() {
    let mut fx = Fixture::new();
    write(
        fx.root(),
        "inner/.latus/history.db",
        b"another folder's state",
    );
    write(fx.root(), "inner/data", b"d");
    fx.scan();
    let entries = current(&fx.store);
    assert!(entries.contains_key("inner/data"));
    assert!(
        !entries.keys().any(|p| p.contains(".latus")),
        "{:?}",
        entries.keys()
    );
    drop(fx.dir);
}

#[test]
fn a_killed_merge_leaves_temp_files_that_the_next_scan_removes() {
    let mut fx = Fixture::new();
    write(fx.root(), "sub/real.txt", b"r");
    write(fx.root(), "sub/.latus-tmp-4242-7", b"half a file");
    write(fx.root(), ".latus-tmp-4242-8", b"another");
    fx.scan();
    let entries = current(&fx.store);
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["sub", "sub/real.txt"]);
    assert!(!fx.root().join("sub/.latus-tmp-4242-7").exists());
    assert!(!fx.root().join(".latus-tmp-4242-8").exists());
}

/// Counts the batches a scan commits, and when the first one came.
#[derive(Default)]
struct Batches {
    committed: Mutex<Vec<(Instant, usize)>>,
}

impl ScanObserver for Batches {
    fn batch_committed(&self, entries: usize, _last_seq: u64) {
        self.committed
            .lock()
            .unwrap()
            .push((Instant::now(), entries));
    }
}

impl Batches {
    /// The records of each batch committed, in order.
    fn sizes(&self) -> Vec<usize> {
        self.committed
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Peers hear of a slow scan's first files before it ends, even when they are
/// too few to fill a batch: a batch is committed once it has waited a second.
#[test]
fn a_scan_that_announces_its_batches_commits_one_that_waited_a_second() {
    let mut fx = Fixture::new();
    for name in ["a.bin", "b.bin", "c.bin"] {
        write(fx.root(), name, &bytes(400_000, name.len() as u64));
    }
    let batches = Arc::new(Batches::default());
    let started = Instant::now();
    let s = fx.scan_with(ScanOptions {
        // One file at a time, each about 0.8 s: the scan lasts about 2.4 s.
        hash_threads: 1,
        max_read_bytes_per_sec: 500_000.0,
        observer: Some(Arc::clone(&batches) as Arc<dyn ScanObserver>),
        ..ScanOptions::default()
    });
    let ended = started.elapsed();
    assert_eq!(s.new, 3);
    let committed = batches.committed.lock().unwrap().clone();
    assert!(committed.len() >= 2, "{committed:?} in {ended:?}");
    let first = committed[0].0 - started;
    assert!(
        first < ended - Duration::from_millis(500),
        "the first batch came at {first:?}, the scan ended at {ended:?}"
    );
    assert_eq!(committed.iter().map(|(_, n)| n).sum::<usize>(), 3);
    fx.assert_history_matches_disk();
}

/// A directory is recorded before what it holds: peers that apply a first scan
/// batch by batch then make it with its own mode, not with one of theirs.
#[test]
fn a_scan_records_each_directory_before_what_is_under_it() {
    let mut fx = Fixture::new();
    for i in 0..600 {
        write(
            fx.root(),
            &format!("album/disc{}/t{i:03}", i % 3),
            &bytes(1000, i),
        );
    }
    fx.scan_with(ScanOptions {
        batch_size: 20,
        ..ScanOptions::default()
    });
    let entries = current(&fx.store);
    assert_eq!(entries.len(), 604);
    for (path, entry) in &entries {
        if let Some((parent, _)) = path.rsplit_once('/') {
            assert!(
                entries[parent].seq < entry.seq,
                "{parent} recorded after {path}"
            );
        }
    }
}

/// Stopping a scan in its first file ends it with an error; the files already
/// hashed stay recorded, and the next scan records the rest.
#[test]
fn a_stopped_scan_ends_at_once_and_the_next_one_records_the_rest() {
    let mut fx = Fixture::new();
    for i in 0..300 {
        write(fx.root(), &format!("d{}/f{i:03}", i % 3), &bytes(2000, i));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_at_first_read = Arc::clone(&stop);
    let options = ScanOptions {
        stop: Some(Arc::clone(&stop)),
        ..with_observer(OnRead(move |_: &str, _| {
            stop_at_first_read.store(true, Ordering::SeqCst)
        }))
    };
    let err = scan(&fx.folder, &mut fx.store, DEVICE, &options).unwrap_err();
    assert!(matches!(err, latus::Error::ScanAborted(_)), "{err}");
    let recorded = current(&fx.store).len();
    assert!(recorded < 100, "{recorded} entries recorded after the stop");
    let s = fx.scan();
    assert_eq!(s.new as usize + recorded, 303);
    fx.assert_history_matches_disk();
}

/// The first batch a scan announces is small, so that peers start on it at once;
/// the next ones are full.
#[test]
fn a_scan_that_announces_its_batches_makes_the_first_one_small() {
    let mut fx = Fixture::new();
    for i in 0..1250 {
        write(fx.root(), &format!("f{i:04}"), b"x");
    }
    let batches = Arc::new(Batches::default());
    let s = fx.scan_with(ScanOptions {
        observer: Some(Arc::clone(&batches) as Arc<dyn ScanObserver>),
        ..ScanOptions::default()
    });
    assert_eq!(s.new, 1250);
    let sizes = batches.sizes();
    // [100, 1000, 150], unless a batch waited a second on a slow machine.
    assert_eq!(sizes.first(), Some(&100), "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 1000), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 1250);
}

/// A scan that announces its batches commits one once it holds 64 MiB of
/// content, however few its records: peers start on the first big files while
/// the others are still hashed.
#[test]
fn a_scan_that_announces_its_batches_commits_one_that_holds_64_mib() {
    let mut fx = Fixture::new();
    for name in ["a.bin", "b.bin", "c.bin"] {
        write(fx.root(), name, &bytes(33 << 20, name.as_bytes()[0] as u64));
    }
    let batches = Arc::new(Batches::default());
    let s = fx.scan_with(ScanOptions {
        hash_threads: 1,
        observer: Some(Arc::clone(&batches) as Arc<dyn ScanObserver>),
        ..ScanOptions::default()
    });
    assert_eq!(s.new, 3);
    let sizes = batches.sizes();
    // [2, 1]: 66 MiB after the second file (or smaller, if a batch waited a
    // second on a slow machine).
    assert!(sizes.len() >= 2 && sizes[0] <= 2, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 3);
    fx.assert_history_matches_disk();
}

#[test]
fn a_chunk_is_served_unhashed_only_while_its_file_keeps_the_stat_it_was_hashed_with() {
    let mut fx = Fixture::new();
    let content = bytes(300_000, 5);
    write(fx.root(), "f.bin", &content);
    backdate(fx.root());
    fx.scan();
    let recorded = fx.store.latest_by_path("f.bin").unwrap().unwrap();
    assert_ne!(
        recorded.ctime_ns, 0,
        "hashed a minute after its mtime: not racy"
    );
    let chunks = fx.store.chunks_of(&recorded.hash.unwrap()).unwrap();
    assert!(chunks.len() > 1);
    let source = FolderPeer::open(&fx.folder).unwrap();
    // Every chunk, asked for together as a peer asks: one read of the file.
    let serve = |source: &FolderPeer| {
        source
            .serve_chunks("f.bin", &recorded.hash.unwrap(), &chunks)
            .unwrap()
    };
    let bytes_of = |data: &[u8], chunk: &ChunkInfo| {
        data[chunk.offset as usize..][..chunk.len as usize].to_vec()
    };
    let whole: Vec<_> = chunks.iter().map(|c| Some(bytes_of(&content, c))).collect();
    assert_eq!(serve(&source), whole);

    // Rewritten in place with its size and mtime put back: only its ctime tells,
    // and the source then hashes what it read.
    let mut changed = content.clone();
    changed[chunks[1].offset as usize..][..chunks[1].len as usize].fill(0xAB);
    let mtime = fs::metadata(fx.root().join("f.bin"))
        .unwrap()
        .modified()
        .unwrap();
    fs::write(fx.root().join("f.bin"), &changed).unwrap();
    fs::File::options()
        .write(true)
        .open(fx.root().join("f.bin"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // The changed chunk is refused; the others, hashed, still go out.
    let mut unchanged = whole.clone();
    unchanged[1] = None;
    assert_eq!(serve(&source), unchanged);
    assert_eq!(
        source
            .read_chunk("f.bin", &recorded.hash.unwrap(), &chunks[1])
            .unwrap(),
        None
    );
}

/// The nice value of the calling thread.
fn thread_nice() -> i32 {
    // SAFETY: getpriority only reads this thread's priority.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

#[test]
fn a_background_scan_hashes_big_files_at_a_lower_priority() {
    // The nice value of each thread that read for hashing, by path, in a first scan.
    let hashed_at = |background: bool| {
        let mut fx = Fixture::new();
        write(fx.root(), "small.bin", &bytes(100_000, 9));
        write(fx.root(), "big.bin", &bytes(9 << 20, 10));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        fx.scan_with(ScanOptions {
            background,
            ..with_observer(OnRead(move |path: &str, _| {
                record
                    .lock()
                    .unwrap()
                    .push((path.to_string(), thread_nice()))
            }))
        });
        let seen = seen.lock().unwrap().clone();
        let of = |name: &str| -> Vec<i32> {
            let nices: Vec<i32> = seen
                .iter()
                .filter(|(p, _)| p == name)
                .map(|(_, n)| *n)
                .collect();
            assert!(!nices.is_empty(), "{name} was read");
            nices
        };
        (of("small.bin"), of("big.bin"))
    };
    let own = thread_nice();
    let (small, big) = hashed_at(false);
    assert!(small.iter().chain(&big).all(|&nice| nice == own));
    let (small, big) = hashed_at(true);
    assert!(small.iter().all(|&nice| nice == own));
    // At 10, or (a process already nicer cannot always go back) as they were.
    let background = latus::scan::BACKGROUND_NICE;
    assert!(
        big.iter()
            .all(|&nice| nice == background || (own > background && nice == own))
    );
    // The thread that ran the scan keeps its priority.
    assert_eq!(thread_nice(), own);
}
