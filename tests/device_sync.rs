//! Scenario tests of device mode (`latus::device_sync::sync_device`): a Latus
//! folder and a "dumb device" directory that is compared by size and mtime only,
//! with case-insensitive names.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{backdate, bytes, files, names, trashed, tree, write};
use latus::Error;
use latus::device_sync::sync_device;
use latus::history::{HistoryStore, Kind};
use latus::sync::{SyncOptions, SyncReport};

struct Setup {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dev: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (src, dev) = (dir.path().join("src"), dir.path().join("dev"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dev).unwrap();
        Setup {
            _dir: dir,
            src,
            dev,
        }
    }

    fn sync(&self) -> SyncReport {
        self.sync_with(false, &SyncOptions::default()).unwrap()
    }

    fn sync_one_way(&self) -> SyncReport {
        self.sync_with(true, &SyncOptions::default()).unwrap()
    }

    fn sync_with(&self, one_way: bool, options: &SyncOptions) -> latus::Result<SyncReport> {
        sync_device(&self.src, &self.dev, options, one_way)
    }

    /// Syncs and checks what every device sync must leave: the same files and
    /// directories on both sides (symlinks stay on SRC), mtimes within 2 s.
    fn converge(&self, one_way: bool) -> SyncReport {
        let report = self.sync_with(one_way, &SyncOptions::default()).unwrap();
        assert!(report.identical, "{:?}", report.differences);
        self.assert_same();
        report
    }

    fn assert_same(&self) {
        let src = device_view(&self.src);
        let dev = device_view(&self.dev);
        assert_eq!(
            src.keys().collect::<Vec<_>>(),
            dev.keys().collect::<Vec<_>>()
        );
        for (path, (content, mtime)) in &src {
            let (dev_content, dev_mtime) = &dev[path];
            assert_eq!(content, dev_content, "{path}");
            assert!((mtime - dev_mtime).abs() <= 2_000_000_000, "{path}");
        }
    }

    fn inode(&self, rel: &str) -> u64 {
        fs::metadata(self.dev.join(rel)).unwrap().ino()
    }
}

/// What a device holds of a tree: files (content, mtime) and directories.
fn device_view(root: &std::path::Path) -> BTreeMap<String, (Option<Vec<u8>>, i64)> {
    tree(root)
        .into_iter()
        .filter_map(|(path, (kind, content, mtime, _))| match kind {
            Kind::File => Some((path, (Some(content), mtime))),
            Kind::Dir => Some((path, (None, 0))),
            _ => None,
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn set_mtime(path: &std::path::Path, time: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

#[test]
fn a_first_sync_copies_the_folder_and_leaves_symlinks_out() {
    let s = Setup::new();
    write(&s.src, "Music/Album/01.mp3", &bytes(200_000, 1));
    write(&s.src, "notes.txt", b"notes");
    fs::create_dir(s.src.join("empty")).unwrap();
    symlink("notes.txt", s.src.join("link")).unwrap();
    let report = s.converge(false);
    assert_eq!(report.b.bytes_fetched, 200_005);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("link: a symlink")),
        "{:?}",
        report.warnings
    );
    assert!(!s.dev.join("link").exists());
    let again = s.converge(false);
    assert_eq!(again.a.applied + again.b.applied, 0);
    assert!(again.actions.is_empty());
}

#[test]
fn the_device_is_compared_by_size_and_mtime_and_never_read() {
    let s = Setup::new();
    write(&s.src, "song.mp3", b"original");
    backdate(&s.src);
    s.converge(false);
    // Same size, same mtime, other bytes: only reading would tell.
    let path = s.dev.join("song.mp3");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    fs::write(&path, b"ORIGINAL").unwrap();
    set_mtime(&path, mtime);
    let report = s.sync();
    assert!(report.actions.is_empty(), "{:?}", report.actions);
    assert_eq!(fs::read(s.src.join("song.mp3")).unwrap(), b"original");

    // A new mtime is a change: it is read and brought back.
    set_mtime(&path, SystemTime::now() - Duration::from_secs(10));
    s.converge(false);
    assert_eq!(fs::read(s.src.join("song.mp3")).unwrap(), b"ORIGINAL");
    assert_eq!(trashed(&s.src), vec![b"original".to_vec()]);
}

#[test]
fn case_only_rename_in_device_mode() {
    let s = Setup::new();
    write(&s.src, "Music/Song.mp3", &bytes(100_000, 2));
    write(&s.src, "Music/other.mp3", &bytes(50_000, 3));
    backdate(&s.src);
    s.converge(false);
    let song = s.inode("Music/Song.mp3");

    fs::rename(s.src.join("Music/Song.mp3"), s.src.join("Music/song.mp3")).unwrap();
    let report = s.converge(false);
    assert_eq!(names(&s.dev.join("Music")), ["other.mp3", "song.mp3"]);
    assert_eq!(s.inode("Music/song.mp3"), song, "renamed, not copied");
    assert_eq!(report.b.bytes_fetched + report.b.bytes_local, 0);
    assert!(trashed(&s.dev).is_empty());

    // A directory renamed in case only: renamed once, its files untouched.
    fs::rename(s.src.join("Music"), s.src.join("MUSIC")).unwrap();
    let report = s.converge(false);
    assert_eq!(names(&s.dev), ["MUSIC"]);
    assert_eq!(s.inode("MUSIC/song.mp3"), song);
    assert_eq!(report.b.bytes_fetched + report.b.bytes_local, 0);
    assert_eq!(names(&s.src), ["MUSIC"]);
}

#[test]
fn names_that_collide_by_case_overwrite_nothing() {
    let s = Setup::new();
    write(&s.src, "Readme.txt", b"first");
    write(&s.src, "README.txt", b"second");
    let report = s.sync();
    assert!(
        report.warnings.iter().any(|w| w.contains(
            "Readme.txt: not copied to the device, its name differs only in case from README.txt"
        )),
        "{:?}",
        report.warnings
    );
    assert_eq!(names(&s.dev), ["README.txt"]);
    assert_eq!(fs::read(s.dev.join("README.txt")).unwrap(), b"second");
    // SRC keeps both, untouched; later syncs leave things as they are.
    assert_eq!(fs::read(s.src.join("Readme.txt")).unwrap(), b"first");
    assert_eq!(fs::read(s.src.join("README.txt")).unwrap(), b"second");
    let again = s.sync();
    assert!(again.actions.is_empty(), "{:?}", again.actions);

    // A file on the device whose name differs only in case from SRC's, with other
    // content and no record: both versions are kept on both sides.
    write(&s.src, "notes.TXT", b"src notes");
    write(&s.dev, "NOTES.txt", b"device notes, longer");
    let report = s.sync();
    assert_eq!(report.conflicts.len(), 1, "{:?}", report.actions);
    let copy = &report.conflicts[0].copy_path;
    for root in [&s.src, &s.dev] {
        let found = files(root);
        let winner = found.get("notes.TXT").or(found.get("NOTES.txt")).unwrap();
        let loser = &found[copy];
        let mut both = vec![winner.clone(), loser.clone()];
        both.sort();
        assert_eq!(
            both,
            [b"device notes, longer".to_vec(), b"src notes".to_vec()]
        );
    }
    let again = s.sync();
    assert!(again.actions.is_empty(), "{:?}", again.actions);
}

#[test]
fn moves_and_copies_on_the_source_are_renames_and_copies_on_the_device() {
    let s = Setup::new();
    write(&s.src, "a/big.bin", &bytes(3_000_000, 4));
    backdate(&s.src);
    s.converge(false);
    let big = s.inode("a/big.bin");

    fs::create_dir(s.src.join("b")).unwrap();
    fs::rename(s.src.join("a/big.bin"), s.src.join("b/moved.bin")).unwrap();
    let report = s.converge(false);
    assert_eq!(s.inode("b/moved.bin"), big);
    assert_eq!(report.b.bytes_fetched + report.b.bytes_local, 0);

    fs::copy(s.src.join("b/moved.bin"), s.src.join("b/copy.bin")).unwrap();
    let report = s.converge(false);
    assert_eq!(report.b.bytes_fetched, 0, "the copy is made on the device");
    assert_eq!(report.b.bytes_local, 3_000_000);
}

#[test]
fn changes_on_the_device_flow_back() {
    let s = Setup::new();
    write(&s.src, "keep.txt", b"keep");
    write(&s.src, "gone.txt", b"deleted on the device");
    write(&s.src, "edited.txt", b"before");
    backdate(&s.src);
    s.converge(false);

    fs::remove_file(s.dev.join("gone.txt")).unwrap();
    write(&s.dev, "edited.txt", b"edited on the device");
    write(&s.dev, "new/made.txt", b"made on the device");
    let report = s.converge(false);
    assert!(report.conflicts.is_empty());
    let src = files(&s.src);
    assert!(!src.contains_key("gone.txt"));
    assert_eq!(src["edited.txt"], b"edited on the device");
    assert_eq!(src["new/made.txt"], b"made on the device");
    // Nothing lost: what SRC held before is in its trash.
    let mut kept = trashed(&s.src);
    kept.sort();
    assert_eq!(
        kept,
        [b"before".to_vec(), b"deleted on the device".to_vec()]
    );
    // The device is the author of what came from it.
    let store = HistoryStore::open(&s.src.join(".latus/history.db")).unwrap();
    let edited = store.latest_by_path("edited.txt").unwrap().unwrap();
    let device_id = fs::read_to_string(s.dev.join(".latus/device-id")).unwrap();
    assert_eq!(hex(&edited.author_peerid.0), device_id.trim());
    assert_eq!(edited.peerid, store.replica_id().unwrap());
}

#[test]
fn one_way_makes_the_device_a_mirror_and_keeps_its_changes_in_its_trash() {
    let s = Setup::new();
    write(&s.src, "a.txt", b"a");
    write(&s.src, "b.txt", b"b");
    backdate(&s.src);
    s.converge(true);

    fs::remove_file(s.dev.join("a.txt")).unwrap();
    write(&s.dev, "b.txt", b"b edited on the device");
    write(&s.dev, "extra.txt", b"only on the device");
    s.sync_one_way();
    assert_eq!(files(&s.src), files(&s.dev));
    assert_eq!(files(&s.src).keys().collect::<Vec<_>>(), ["a.txt", "b.txt"]);
    let mut kept = trashed(&s.dev);
    kept.sort();
    assert_eq!(
        kept,
        [
            b"b edited on the device".to_vec(),
            b"only on the device".to_vec()
        ]
    );
    s.converge(true);
}

#[test]
fn source_changes_replace_and_delete_on_the_device_keeping_the_last_copies() {
    let s = Setup::new();
    write(&s.src, "edit.txt", b"old");
    write(&s.src, "delete.txt", b"deleted on src");
    write(&s.src, "dup1.txt", b"same");
    write(&s.src, "dup2.txt", b"same");
    backdate(&s.src);
    s.converge(false);

    write(&s.src, "edit.txt", b"new version");
    fs::remove_file(s.src.join("delete.txt")).unwrap();
    fs::remove_file(s.src.join("dup2.txt")).unwrap();
    s.converge(false);
    assert_eq!(fs::read(s.dev.join("edit.txt")).unwrap(), b"new version");
    // The device's old versions are kept, except a copy of what SRC still holds.
    let mut kept = trashed(&s.dev);
    kept.sort();
    assert_eq!(kept, [b"deleted on src".to_vec(), b"old".to_vec()]);
}

#[test]
fn edits_on_both_sides_keep_both_versions() {
    let s = Setup::new();
    write(&s.src, "doc.txt", b"base");
    backdate(&s.src);
    s.converge(false);
    write(&s.src, "doc.txt", b"src edit");
    set_mtime(
        &s.src.join("doc.txt"),
        SystemTime::now() - Duration::from_secs(30),
    );
    write(&s.dev, "doc.txt", b"device edit");
    let report = s.converge(false);
    assert_eq!(report.conflicts.len(), 1);
    let copy = report.conflicts[0].copy_path.clone();
    assert!(copy.starts_with("doc.sync-conflict-"), "{copy}");
    // The later mtime (the device's) keeps the name.
    for root in [&s.src, &s.dev] {
        assert_eq!(fs::read(root.join("doc.txt")).unwrap(), b"device edit");
        assert_eq!(fs::read(root.join(&copy)).unwrap(), b"src edit");
    }
}

#[test]
fn an_unmounted_device_is_refused_and_a_wiped_one_stops_at_mass_delete() {
    let s = Setup::new();
    for i in 0..20 {
        write(&s.src, &format!("f{i}.txt"), format!("file {i}").as_bytes());
    }
    backdate(&s.src);
    s.converge(false);

    // Everything removed but the marker: more than half of SRC would go.
    for i in 0..20 {
        fs::remove_file(s.dev.join(format!("f{i}.txt"))).unwrap();
    }
    let err = s.sync_with(false, &SyncOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::MassDelete { deletes: 20, .. }),
        "{err}"
    );
    assert_eq!(files(&s.src).len(), 20);

    // An empty mount point (no marker): refused, SRC untouched.
    fs::remove_dir_all(&s.dev).unwrap();
    fs::create_dir(&s.dev).unwrap();
    let err = s.sync_with(false, &SyncOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingMarker(_)), "{err}");
    assert_eq!(files(&s.src).len(), 20);
    assert!(names(&s.dev).is_empty());
}

#[test]
fn a_device_copy_within_the_mtime_window_is_taken_as_in_sync() {
    let s = Setup::new();
    let content = bytes(500_000, 5);
    write(&s.src, "track.flac", &content);
    let past = SystemTime::now() - Duration::from_secs(600);
    set_mtime(
        &s.src.join("track.flac"),
        past + Duration::from_millis(1_500),
    );
    // Already on the device, its mtime truncated to FAT's 2 s steps.
    write(&s.dev, "TRACK.FLAC", &content);
    set_mtime(&s.dev.join("TRACK.FLAC"), past);
    let report = s.sync();
    assert_eq!(report.b.bytes_fetched, 0);
    // SRC's spelling is applied by a rename.
    assert_eq!(names(&s.dev), ["track.flac"]);
    assert!(report.identical);
}
