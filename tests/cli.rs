//! End-to-end tests of the `latus` binary: real processes, real folders.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{backdate, bytes, disk_state, recorded_state, write};
use latus::folder::Folder;
use latus::history::HistoryStore;
use serde_json::Value;

const LATUS: &str = env!("CARGO_BIN_EXE_latus");

/// A device home and a folder to scan, both temporary.
struct Setup {
    home: tempfile::TempDir,
    root: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            home: tempfile::tempdir().unwrap(),
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(LATUS);
        cmd.env("LATUS_HOME", self.home.path())
            .env_remove("LATUS_LOG");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn scan_json(&self) -> Value {
        let out = self.run(&["scan", "--json", self.root().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn store(&self) -> HistoryStore {
        HistoryStore::open_read_only(&self.root().join(".latus/history.db")).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 2 and exactly one line on stderr that contains `needle`.
fn assert_fails_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(
        err.starts_with("latus: error: ") && err.contains(needle),
        "{err}"
    );
}

#[test]
fn init_prints_a_peer_id_that_stays_the_same() {
    let setup = Setup::new();
    let first = setup.run(&["init", "--json"]);
    assert!(first.status.success());
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["created"], true);
    let second: Value = serde_json::from_slice(&setup.run(&["init", "--json"]).stdout).unwrap();
    assert_eq!(second["created"], false);
    assert_eq!(first["peer_id"], second["peer_id"]);
    let id = first["peer_id"].as_str().unwrap();
    assert!(id.parse::<latus::device::PeerId>().is_ok(), "{id}");
    let text = String::from_utf8(setup.run(&["init"]).stdout).unwrap();
    assert!(text.contains(id), "{text}");
}

#[test]
fn scan_and_log_report_what_is_on_disk() {
    let setup = Setup::new();
    write(setup.root(), "docs/a.txt", b"first");
    write(setup.root(), "b.bin", &bytes(100_000, 1));
    let summary = setup.scan_json();
    assert_eq!(summary["files"], 2);
    assert_eq!(summary["dirs"], 1);
    assert_eq!(summary["new"], 3);
    assert_eq!(summary["bytes_hashed"], 100_005);
    assert!(summary["seconds"].as_f64().unwrap() >= 0.0);

    write(setup.root(), "docs/a.txt", b"second, longer");
    let summary = setup.scan_json();
    assert_eq!(
        (summary["changed"].as_u64(), summary["unchanged"].as_u64()),
        (Some(1), Some(2))
    );

    // The history of one file, newest first, one JSON object per line.
    let root = setup.root().to_str().unwrap();
    let out = setup.run(&["log", "--json", root, "docs/a.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["size"], 14);
    assert_eq!(lines[1]["size"], 5);
    assert!(lines[0]["seq"].as_u64() > lines[1]["seq"].as_u64());
    assert_eq!(
        lines[0]["hash"].as_str().unwrap(),
        latus::content::Hash::of(b"second, longer").to_hex()
    );
    // The author is this folder's replica id (each folder is a replica of its own).
    let replica = setup.store().replica_id().unwrap().to_string();
    assert_eq!(lines[0]["author_peerid"], replica.as_str());

    // The same file named by its absolute path, in text form.
    let abs = setup.root().join("docs/a.txt");
    let text = setup.run(&["log", root, abs.to_str().unwrap()]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().count(), 2);
    let short = &latus::content::Hash::of(b"second, longer").to_hex()[..12];
    assert!(text.lines().next().unwrap().contains(short), "{text}");
    assert!(text.contains("docs/a.txt"));

    // The whole folder's log: 4 entries, newest first.
    let all = String::from_utf8(setup.run(&["log", root]).stdout).unwrap();
    assert_eq!(all.lines().count(), 4);
    assert!(all.lines().next().unwrap().ends_with("docs/a.txt"), "{all}");
}

#[test]
fn bad_paths_give_one_line_errors() {
    let setup = Setup::new();
    let missing = setup.root().join("missing");
    assert_fails_with(
        &setup.run(&["scan", missing.to_str().unwrap()]),
        "does not exist",
    );
    let file = setup.root().join("file");
    fs::write(&file, b"x").unwrap();
    assert_fails_with(
        &setup.run(&["scan", file.to_str().unwrap()]),
        "is not a directory",
    );
    let unscanned = tempfile::tempdir().unwrap();
    let out = setup.run(&["log", unscanned.path().to_str().unwrap()]);
    assert_fails_with(&out, "is not a Latus folder");
    assert!(
        !unscanned.path().join(".latus").exists(),
        "log creates nothing"
    );
}

#[test]
fn a_corrupt_database_is_reported_and_left_untouched() {
    let setup = Setup::new();
    write(setup.root(), "f", b"data");
    setup.scan_json();
    let db = setup.root().join(".latus/history.db");
    let garbage = bytes(64 * 1024, 9);
    fs::write(&db, &garbage).unwrap();
    // The WAL a run leaves behind holds the newest pages, and SQLite would read
    // those instead of the garbage: the whole database is garbage here.
    for left in ["history.db-wal", "history.db-shm"] {
        fs::remove_file(setup.root().join(".latus").join(left)).unwrap();
    }
    let root = setup.root().to_str().unwrap();
    assert_fails_with(&setup.run(&["scan", root]), "is corrupt");
    assert_fails_with(&setup.run(&["log", root]), "is corrupt");
    assert_eq!(fs::read(&db).unwrap(), garbage, "the evidence is kept");
}

#[test]
fn a_database_locked_by_another_process_is_reported() {
    let setup = Setup::new();
    write(setup.root(), "f", b"data");
    setup.scan_json();
    write(setup.root(), "g", b"more");
    // Another program holding a write transaction on the database.
    let conn = rusqlite::Connection::open(setup.root().join(".latus/history.db")).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let out = setup.run(&["scan", setup.root().to_str().unwrap()]);
    assert_fails_with(&out, "locked by another process");
    conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(setup.scan_json()["new"], 1);
}

#[test]
fn a_folder_in_use_by_another_latus_is_reported() {
    let setup = Setup::new();
    setup.scan_json();
    let folder = Folder::open(setup.root()).unwrap();
    let _held = folder.lock().unwrap();
    let out = setup.run(&["scan", setup.root().to_str().unwrap()]);
    assert_fails_with(&out, "another latus process");
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A `latus` command that file permissions apply to, even when the tests run as
/// root (root normally reads anything): drop the capabilities that bypass them.
fn command_without_permission_bypass(setup: &Setup) -> Command {
    let mut cmd = if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set", "-dac_override,-dac_read_search", LATUS]);
        c
    } else {
        Command::new(LATUS)
    };
    cmd.env("LATUS_HOME", setup.home.path());
    cmd
}

#[test]
fn unreadable_files_and_dirs_get_a_warning_and_keep_their_history() {
    let setup = Setup::new();
    write(setup.root(), "secret.txt", b"v1");
    write(setup.root(), "private/inside.txt", b"in");
    write(setup.root(), "public.txt", b"p");
    setup.scan_json();
    let before = recorded_state(&setup.store());

    let secret = setup.root().join("secret.txt");
    let private = setup.root().join("private");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let scan = |setup: &Setup| {
        command_without_permission_bypass(setup)
            .args(["scan", "--json", setup.root().to_str().unwrap()])
            .output()
            .unwrap()
    };
    // The chmod moved the file's ctime, so it is read again, and that read fails.
    let out = scan(&setup);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("secret.txt: cannot read"),
        "{}",
        stderr(&out)
    );

    fs::set_permissions(&private, fs::Permissions::from_mode(0o000)).unwrap();
    write(setup.root(), "public.txt", b"p2");
    let out = scan(&setup);
    fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = summary["warnings"].to_string();
    assert!(warnings.contains("secret.txt: cannot read"), "{warnings}");
    assert!(warnings.contains("private: cannot read"), "{warnings}");
    // Changed: public.txt's content and private's mode; nothing deleted.
    assert_eq!(
        (summary["changed"].as_u64(), summary["deleted"].as_u64()),
        (Some(2), Some(0))
    );
    let after = recorded_state(&setup.store());
    assert_eq!(after["secret.txt"], before["secret.txt"]);
    assert_eq!(after["private/inside.txt"], before["private/inside.txt"]);
}

#[test]
fn unchanged_files_are_not_read_even_when_unreadable() {
    // Only root can record a mode-000 file and then lose the right to read it
    // without touching its ctime; unprivileged runs rely on tests/scan.rs's counter.
    if !running_as_root() {
        return;
    }
    let setup = Setup::new();
    write(setup.root(), "a.txt", b"a");
    backdate(setup.root());
    fs::set_permissions(
        setup.root().join("a.txt"),
        fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    assert_eq!(setup.scan_json()["new"], 1);
    let out = command_without_permission_bypass(&setup)
        .args(["scan", "--json", setup.root().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Reading would have failed with a warning.
    assert_eq!(summary["files_hashed"], 0);
    assert_eq!(
        summary["warnings"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
}

#[test]
fn a_scan_killed_mid_way_is_completed_by_the_next_one() {
    let setup = Setup::new();
    for i in 0..3000 {
        write(
            setup.root(),
            &format!("d{}/f{i:04}", i % 10),
            &bytes(4000, i),
        );
    }
    let db = setup.root().join(".latus/history.db");
    // Throttled so it is still running after its first batches are committed.
    let mut child = setup
        .command()
        .args([
            "scan",
            "--max-read-mbps",
            "1",
            setup.root().to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut committed = 0;
    while committed < 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        committed = HistoryStore::open_read_only(&db)
            .and_then(|s| s.last_seq())
            .unwrap_or(0);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "scan ended before the kill"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(committed >= 1000, "no batch committed within 30 s");

    let summary = setup.scan_json();
    let recorded_before_kill = setup.store().last_seq().unwrap() - summary["new"].as_u64().unwrap();
    assert!(recorded_before_kill >= 1000, "{summary}");
    assert_eq!(summary["deleted"], 0);
    assert_eq!(summary["files"], 3000);
    assert_eq!(recorded_state(&setup.store()), disk_state(setup.root()));
    let again = setup.scan_json();
    assert_eq!(
        (again["new"].as_u64(), again["changed"].as_u64()),
        (Some(0), Some(0))
    );
}
