//! End-to-end tests of `latus sync` and `latus trash` with the real binary.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bytes, files, names, tree, write};
use serde_json::Value;

const LATUS: &str = env!("CARGO_BIN_EXE_latus");

struct Setup {
    dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        Setup { dir, a, b }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(LATUS);
        cmd.env("LATUS_HOME", self.dir.path().join("home"))
            .env_remove("LATUS_LOG");
        cmd
    }

    fn sync(&self, extra: &[&str]) -> Output {
        self.command()
            .arg("sync")
            .args(extra)
            .args([&self.a, &self.b])
            .output()
            .unwrap()
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exit_status_tells_in_sync_from_conflicts() {
    let s = Setup::new();
    write(&s.a, "one.txt", b"1");
    let out = s.sync(&[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(text(&out).0.contains("in sync"));

    write(&s.a, "one.txt", b"edited on a");
    write(&s.b, "one.txt", b"edited on b");
    let out = s.sync(&[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("conflict: one.txt"), "{stdout}");
    assert_eq!(tree(&s.a), tree(&s.b));

    let out = s.sync(&["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["identical"], true);
    assert_eq!(report["conflicts"].as_array().unwrap().len(), 0);
}

#[test]
fn dry_run_prints_one_line_per_action_and_changes_nothing() {
    let s = Setup::new();
    write(&s.a, "keep.txt", b"k");
    write(&s.a, "gone.txt", b"g");
    write(&s.a, "old-name.bin", &bytes(2000, 1));
    write(&s.a, "c.txt", b"base");
    assert_eq!(s.sync(&[]).status.code(), Some(0));
    fs::remove_file(s.a.join("gone.txt")).unwrap();
    fs::rename(s.a.join("old-name.bin"), s.a.join("new-name.bin")).unwrap();
    write(&s.a, "new.txt", b"n");
    fs::copy(s.a.join("keep.txt"), s.a.join("keep-copy.txt")).unwrap();
    write(&s.a, "c.txt", b"edit a");
    write(&s.b, "c.txt", b"edit b");
    let before = (tree(&s.a), tree(&s.b));

    let out = s.sync(&["--dry-run"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for expected in [
        "B: delete gone.txt",
        "B: move old-name.bin -> new-name.bin",
        "B: copy keep.txt -> keep-copy.txt",
        "B: replace new.txt (1 bytes)",
        "conflict c.txt -> c.sync-conflict-",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in:\n{stdout}"
        );
    }
    assert_eq!((tree(&s.a), tree(&s.b)), before);
}

#[test]
fn safety_stops_are_one_clear_line_and_exit_2() {
    let s = Setup::new();
    for i in 0..12 {
        write(&s.a, &format!("f{i}"), b"x");
    }
    assert_eq!(s.sync(&[]).status.code(), Some(0));
    for i in 0..10 {
        fs::remove_file(s.a.join(format!("f{i}"))).unwrap();
    }
    let out = s.sync(&[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("would delete 10 of the 12 files")
            && stderr.contains("--allow-mass-delete"),
        "{stderr}"
    );
    assert_eq!(files(&s.b).len(), 12);
    assert_eq!(s.sync(&["--allow-mass-delete"]).status.code(), Some(0));
    assert_eq!(files(&s.b).len(), 2);

    // B's drive is "unmounted": an empty mount point.
    fs::remove_dir_all(&s.b).unwrap();
    fs::create_dir(&s.b).unwrap();
    let out = s.sync(&[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("is the drive mounted?"), "{stderr}");
    assert_eq!(files(&s.a).len(), 2);
}

#[test]
fn trash_list_and_restore() {
    let s = Setup::new();
    write(&s.a, "notes.txt", b"first");
    assert_eq!(s.sync(&[]).status.code(), Some(0));
    write(&s.a, "notes.txt", b"second");
    assert_eq!(s.sync(&[]).status.code(), Some(0));

    let out = s
        .command()
        .args(["trash", "list", "--json"])
        .arg(&s.b)
        .output()
        .unwrap();
    let items: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["path"], "notes.txt");
    assert_eq!(items[0]["size"], 5);

    let out = s
        .command()
        .args(["trash", "restore"])
        .arg(&s.b)
        .arg("notes.txt")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(fs::read(s.b.join("notes.txt")).unwrap(), b"first");
    // Restoring put the replaced version in the trash: nothing was lost.
    let out = s
        .command()
        .args(["trash", "list"])
        .arg(&s.b)
        .output()
        .unwrap();
    assert_eq!(text(&out).0.lines().count(), 1);

    let out = s
        .command()
        .args(["trash", "restore"])
        .arg(&s.b)
        .arg("never-there.txt")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no trashed version"));
}

/// Every file at a final path of `b` is complete: it is `a`'s file at that path.
/// (The merger's own temp files, `.latus-tmp-*`, are not final paths.)
fn assert_no_partial_files(a: &Path, b: &Path) {
    let on_a = files(a);
    for (path, content) in files(b) {
        if path.rsplit('/').next().unwrap().starts_with(".latus-tmp-") {
            continue;
        }
        assert!(
            on_a.get(&path) == Some(&content),
            "{path} is partial or foreign"
        );
    }
}

#[test]
fn a_sync_killed_while_applying_converges_on_the_next_run() {
    let s = Setup::new();
    for i in 0..6000 {
        write(
            &s.a,
            &format!("d{}/f{i:04}", i % 10),
            &bytes(3000 + i % 500, i as u64),
        );
    }
    let mut child = s
        .command()
        .arg("sync")
        .args([&s.a, &s.b])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let placed = |d: &Path| fs::read_dir(d.join("d0")).map_or(0, |r| r.count());
    while placed(&s.b) < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "sync ended before the kill"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(placed(&s.b) >= 50, "nothing applied within 60 s");
    assert_no_partial_files(&s.a, &s.b);

    let out = s.sync(&[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    // The next run's scan removed the killed run's temp files.
    assert_eq!(tree(&s.a), tree(&s.b));
}

/// A directory to sync in device mode: under `LATUS_TEST_DEVICE_DIR` when set (a
/// mounted FAT or exFAT file system: CI mounts one through FUSE when it can), else
/// in the test's temp dir.
fn device_dir(s: &Setup) -> PathBuf {
    let dev = match std::env::var_os("LATUS_TEST_DEVICE_DIR") {
        Some(mount) => {
            let unique = s.dir.path().file_name().unwrap().to_owned();
            Path::new(&mount).join(unique)
        }
        None => s.dir.path().join("device"),
    };
    fs::create_dir_all(&dev).unwrap();
    dev
}

#[test]
fn case_only_rename_in_device_mode() {
    let s = Setup::new();
    let dev = device_dir(&s);
    let sync_device = |extra: &[&str]| -> Value {
        let out = s
            .command()
            .args(["sync", "--device", "--json"])
            .args(extra)
            .args([&s.a, &dev])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let song = bytes(2_000_000, 9);
    write(&s.a, "Music/Song.mp3", &song);
    write(&s.a, "Music/Other.mp3", b"other");
    let first = sync_device(&[]);
    assert_eq!(first["identical"], true);
    assert_eq!(first["b"]["bytes_fetched"], 2_000_005);
    assert_eq!(names(&dev.join("Music")), ["Other.mp3", "Song.mp3"]);

    fs::rename(s.a.join("Music/Song.mp3"), s.a.join("Music/song.mp3")).unwrap();
    let renamed = sync_device(&[]);
    assert_eq!(renamed["identical"], true);
    assert_eq!(renamed["b"]["bytes_fetched"], 0, "{renamed}");
    assert_eq!(renamed["b"]["bytes_local"], 0, "{renamed}");
    assert_eq!(names(&dev.join("Music")), ["Other.mp3", "song.mp3"]);
    assert_eq!(fs::read(dev.join("Music/song.mp3")).unwrap(), song);

    // A file deleted on the device comes back with --one-way, and is deleted on
    // the source without it.
    fs::remove_file(dev.join("Music/Other.mp3")).unwrap();
    sync_device(&["--one-way"]);
    assert_eq!(fs::read(dev.join("Music/Other.mp3")).unwrap(), b"other");
    fs::remove_file(dev.join("Music/Other.mp3")).unwrap();
    sync_device(&[]);
    assert_eq!(names(&s.a.join("Music")), ["song.mp3"]);
    fs::remove_dir_all(&dev).unwrap();
}

#[test]
fn one_way_needs_device_mode() {
    let s = Setup::new();
    let out = s.sync(&["--one-way"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--device"), "{:?}", text(&out));
}
