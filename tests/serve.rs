//! End-to-end tests of `latus serve`: real daemons as separate processes on
//! 127.0.0.1, syncing folders over mutual TLS. Every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Device, WAIT, wait_for};
use common::{bytes, write};
use latus::identity::Identity;
use latus::net::protocol::{self, Message, Request, Response, VERSION};
use latus::net::tls;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

/// What these tests read of a device besides what every test reads.
trait Observed {
    fn last_synced(&self) -> Option<u64>;
    fn recorded(&self, path: &str) -> Option<latus::content::Hash>;
}

impl Observed for Device {
    /// When the daemon's last round of the folder finished (Unix seconds).
    fn last_synced(&self) -> Option<u64> {
        let text = fs::read_to_string(self.home.join(latus::daemon::STATUS_FILE)).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["folders"][0]["last_synced"].as_u64()
    }

    /// The content the folder's history records at `path` now.
    fn recorded(&self, path: &str) -> Option<latus::content::Hash> {
        let history = self.folder.join(".latus").join(latus::folder::HISTORY_DB);
        latus::history::HistoryStore::open_read_only(&history)
            .and_then(|store| store.latest_by_path(path))
            .ok()
            .flatten()
            .and_then(|entry| entry.hash)
    }
}

/// Every file's content and every directory under `root`, `.latus/` left out.
fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".latus" || rel.contains(".latus-tmp-") {
                continue;
            }
            if path.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, fs::read(&path).ok());
            }
        }
    }
    out
}

fn wait_same(a: &Device, b: &Device) {
    let start = Instant::now();
    while tree(&a.folder) != tree(&b.folder) {
        assert!(
            start.elapsed() < WAIT,
            "the folders still differ:\nA {:?}\nB {:?}\nA's log:\n{}\nB's log:\n{}",
            tree(&a.folder).keys().collect::<Vec<_>>(),
            tree(&b.folder).keys().collect::<Vec<_>>(),
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Says a hello that offers no folder, as a hand-made client.
async fn say_hello<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S) {
    let hello = Message::Hello {
        version: VERSION,
        name: "test".into(),
        folders: vec![],
    };
    protocol::write_frame(stream, &hello).await.unwrap();
}

/// A and B share "docs"; B knows A's address.
fn pair() -> (Device, Device) {
    let (mut a, mut b) = (Device::new(), Device::new());
    a.trust(&b, None);
    let addr = a.start();
    b.trust(&a, Some(&addr));
    b.start();
    (a, b)
}

/// A round scans only the paths the watcher named; a change it cannot see (written
/// through a memory map) is found by the periodic full rescan.
#[test]
fn rounds_scan_what_the_watcher_named_and_full_rescans_find_the_rest() {
    let (mut a, mut b) = (Device::new(), Device::new());
    a.trust(&b, None);
    let hidden = bytes(4000, 3);
    write(&a.folder, "hidden.bin", &hidden);
    a.serve_args(&["--rescan-interval", "10"]);
    let a_started = Instant::now();
    let addr = a.start();
    b.trust(&a, Some(&addr));
    b.start();
    wait_for("the first sync", || {
        fs::read(b.folder.join("hidden.bin")).is_ok_and(|c| c == hidden)
    });

    write_through_mmap(&a.folder.join("hidden.bin"), b"unseen");
    write(&a.folder, "seen.txt", b"seen");
    wait_for("the watched change", || b.folder.join("seen.txt").exists());
    // The next full rescan is 9 to 11 s after the first round.
    if a_started.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            a.recorded("hidden.bin"),
            Some(latus::content::Hash::of(&hidden)),
            "the round after the watched change scanned more than seen.txt"
        );
    }
    wait_for("the periodic full rescan", || {
        fs::read(b.folder.join("hidden.bin")).is_ok_and(|c| c.starts_with(b"unseen"))
    });
}

/// The watcher watches a new directory only after reporting its creation, so the
/// files written into it at once raise no event: the round that the creation
/// starts must still find them. With the shortest delay, rounds start while the
/// watcher is still busy; a file missed would wait for the hourly rescan.
#[test]
fn files_written_into_a_directory_just_created_are_all_recorded() {
    let mut a = Device::new();
    a.serve_args(&["--watch-delay", "0.001"]);
    a.start();
    wait_for("the first round", || a.last_synced().is_some());
    let mut written = Vec::new();
    for dir in 0..10 {
        for file in 0..40 {
            let rel = format!("new{dir}/f{file}.txt");
            write(&a.folder, &rel, rel.as_bytes());
            written.push(rel);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let missing = || {
        written
            .iter()
            .filter(|rel| a.recorded(rel).is_none())
            .collect::<Vec<_>>()
    };
    let start = Instant::now();
    while !missing().is_empty() {
        // Far less than the next full rescan, an hour away.
        assert!(start.elapsed() < WAIT, "never recorded: {:?}", missing());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The merger leaves a file that changed since its last scan alone, and the
/// daemon rescans it itself even when the watcher saw nothing (a write through a
/// memory map): then the rules decide, and both edits are kept.
#[test]
fn a_local_edit_the_watcher_missed_is_rescanned_when_a_peer_edit_meets_it() {
    let (a, b) = pair();
    write(&a.folder, "doc.txt", b"first version of the document");
    wait_same(&a, &b);
    // Once B's round for this file reached A, B's watcher has nothing left to
    // say about doc.txt (placing it raised events, and would rescan it).
    write(&b.folder, "marker.txt", b"B is done with doc.txt");
    wait_same(&a, &b);
    write_through_mmap(&b.folder.join("doc.txt"), b"EDITED ON B");
    write(&a.folder, "doc.txt", b"edited on a");
    wait_same(&a, &b);
    let files = tree(&a.folder);
    let copies = files.keys().filter(|n| n.contains("sync-conflict")).count();
    assert_eq!(copies, 1, "{:?}", files.keys());
    let contents: Vec<&[u8]> = files.values().flatten().map(Vec::as_slice).collect();
    assert!(contents.contains(&&b"edited on a"[..]), "{files:?}");
    assert!(
        contents.contains(&&b"EDITED ON Bon of the document"[..]),
        "{files:?}"
    );
}

/// `latus folder` and `latus peer` while the daemons run: a folder shared then
/// syncs at once (its connection says hello again), a peer removed is cut off.
#[test]
fn folders_shared_and_peers_removed_while_running_take_effect() {
    let (a, b) = pair();
    let (a_id, b_id) = (a.id(), b.id());
    for (device, other) in [(&a, &b_id), (&b, &a_id)] {
        let music = device.home.join("music");
        fs::create_dir_all(&music).unwrap();
        device.ok(&["folder", "add", "music", music.to_str().unwrap()]);
        device.ok(&["folder", "share", "music", other]);
    }
    write(&a.home.join("music"), "song.txt", b"la la");
    wait_for("the new folder to sync", || {
        fs::read(b.home.join("music/song.txt")).is_ok_and(|c| c == b"la la")
    });
    assert!(a.log().contains("the folders shared with"), "{}", a.log());

    b.ok(&["peer", "remove", &a_id]);
    wait_for("B to drop A", || {
        a.status()["status"]["peers"][0]["connected"] == false
            && b.status()["status"]["peers"]
                .as_array()
                .is_some_and(|peers| peers.is_empty())
    });
    write(&a.folder, "after.txt", b"too late");
    // A round on A, which B no longer hears of: its dialer for A is gone.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!b.folder.join("after.txt").exists());
}

/// Unsharing a folder with a peer, or removing a folder, takes effect in the
/// running daemons; a removed folder keeps its files.
#[test]
fn a_folder_unshared_or_removed_while_running_no_longer_syncs_and_keeps_its_files() {
    let (a, b) = pair();
    let (a_id, b_id) = (a.id(), b.id());
    // "videos" sorts last: each daemon's round takes its folders in order.
    let folders = ["music", "photos", "videos"];
    for (device, other) in [(&a, &b_id), (&b, &a_id)] {
        for id in folders {
            let dir = device.home.join(id);
            fs::create_dir_all(&dir).unwrap();
            device.ok(&["folder", "add", id, dir.to_str().unwrap()]);
            device.ok(&["folder", "share", id, other]);
        }
    }
    for id in folders {
        write(&a.home.join(id), "before.txt", id.as_bytes());
    }
    wait_for("every folder to sync", || {
        folders.iter().all(|id| {
            fs::read(b.home.join(id).join("before.txt")).is_ok_and(|c| c == id.as_bytes())
        })
    });

    let reconnects = |device: &Device| device.log().matches("the folders shared with").count();
    let a_reconnects = reconnects(&a);
    a.ok(&["folder", "unshare", "music", &b_id]);
    let removed = b.ok(&["folder", "remove", "photos"]);
    assert!(removed.contains("its files stay"), "{removed}");
    wait_for("A to drop music's share with B", || {
        reconnects(&a) > a_reconnects
    });
    wait_for("B to list its folders but photos", || {
        let status = b.status();
        let ids: Vec<_> = status["status"]["folders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["id"].as_str())
            .collect();
        ids == ["docs", "music", "videos"]
    });
    let listed = b.ok(&["folder", "list"]);
    assert!(!listed.contains("photos"), "{listed}");
    // Asked again, each says why it cannot.
    let again = a.run(&["folder", "unshare", "music", &b_id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not shared with"));
    let again = b.run(&["folder", "remove", "photos"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no folder \"photos\""));

    for id in folders {
        write(&a.home.join(id), "after.txt", id.as_bytes());
    }
    // Videos still syncs; B takes music and photos, if at all, before it.
    wait_for("videos to sync", || {
        b.home.join("videos/after.txt").exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!b.home.join("music/after.txt").exists(), "{}", b.log());
    assert!(!b.home.join("photos/after.txt").exists(), "{}", b.log());
    // The removed folder keeps its files and its history.
    assert_eq!(
        fs::read(b.home.join("photos/before.txt")).unwrap(),
        b"photos"
    );
    assert!(
        b.home
            .join("photos/.latus")
            .join(latus::folder::HISTORY_DB)
            .exists()
    );
    // Nor does a change on B's side reach A.
    write(&b.home.join("photos"), "from-b.txt", b"kept here");
    write(&b.home.join("videos"), "from-b.txt", b"synced");
    wait_for("B's videos change to reach A", || {
        a.home.join("videos/from-b.txt").exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!a.home.join("photos/from-b.txt").exists());

    // Added again at another path, a folder is synced from there, and no
    // longer from where it was.
    let moved = a.home.join("videos-moved");
    write(&moved, "moved.txt", b"new place");
    a.ok(&["folder", "add", "videos", moved.to_str().unwrap()]);
    wait_for("the moved folder to sync both ways", || {
        b.home.join("videos/moved.txt").exists() && moved.join("from-b.txt").exists()
    });
    write(&a.home.join("videos"), "left-behind.txt", b"old place");
    write(&moved, "control.txt", b"new place");
    wait_for("the control to reach B", || {
        b.home.join("videos/control.txt").exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !b.home.join("videos/left-behind.txt").exists(),
        "{}",
        a.log()
    );
}

/// The daemon applies the trash policy (`[sync] trash_keep_days`) when it starts,
/// as `latus sync` does.
#[test]
fn the_daemon_empties_the_trash_of_versions_older_than_the_days_kept() {
    let mut a = Device::new();
    fs::write(a.home.join("config.toml"), "[sync]\ntrash_keep_days = 10\n").unwrap();
    let trash = a.folder.join(".latus/trash");
    let old = trash.join(common::trash_batch_of_days_ago(11));
    let recent = trash.join(common::trash_batch_of_days_ago(9));
    for batch in [&old, &recent] {
        write(batch, "notes.txt", b"a replaced version");
    }
    a.start();
    // The line is logged once the batch is gone.
    wait_for("the daemon to log the old trash batch removed", || {
        a.log()
            .contains("removed 1 trash batches older than 10 days")
    });
    assert!(!old.exists());
    assert_eq!(
        fs::read(recent.join("notes.txt")).unwrap(),
        b"a replaced version"
    );
}

/// A peer removed, or a folder unshared, is cut off at once, not once the round
/// under way ends: here A's round is a scan that reads for about 16 s.
#[test]
fn a_peer_removed_during_a_long_round_is_cut_off_at_once() {
    let (mut a, mut b) = (Device::new(), Device::new());
    fs::write(a.home.join("config.toml"), "[scan]\nmax_read_mbps = 1\n").unwrap();
    write(&a.folder, "big.bin", &bytes(16 << 20, 7));
    a.trust(&b, None);
    let addr = a.start();
    b.trust(&a, Some(&addr));
    b.start();
    wait_for("B to connect to A", || {
        b.status()["status"]["peers"][0]["connected"] == true
    });
    wait_for("A's first scan, of about 16 s", || {
        a.status()["status"]["folders"][0]["state"] == "scanning"
    });
    a.ok(&["peer", "remove", &b.id()]);
    wait_for("A to cut B off", || {
        b.status()["status"]["peers"][0]["connected"] == false
    });
    assert_eq!(
        a.status()["status"]["folders"][0]["state"],
        "scanning",
        "A's round ended before B was cut off: {}",
        a.log()
    );
    // B dials again, and is refused.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(b.status()["status"]["peers"][0]["connected"], false);
    assert!(!b.folder.join("big.bin").exists());
}

#[test]
fn two_daemons_sync_creations_edits_renames_and_deletions_both_ways() {
    let (a, b) = pair();
    write(&a.folder, "notes/a.txt", b"from a");
    write(&a.folder, "big.bin", &bytes(3 << 20, 1));
    wait_same(&a, &b);
    assert_eq!(fs::read(b.folder.join("notes/a.txt")).unwrap(), b"from a");

    write(&b.folder, "notes/b.txt", b"from b");
    write(&b.folder, "notes/a.txt", b"edited on b");
    wait_same(&a, &b);
    assert_eq!(
        fs::read(a.folder.join("notes/a.txt")).unwrap(),
        b"edited on b"
    );

    let logged_before = b.log().len();
    fs::rename(a.folder.join("big.bin"), a.folder.join("moved.bin")).unwrap();
    fs::remove_file(a.folder.join("notes/b.txt")).unwrap();
    wait_same(&a, &b);
    assert!(b.folder.join("moved.bin").exists());
    assert!(!b.folder.join("notes/b.txt").exists());
    // The rename travelled as a rename: B read no content for it. Its round's
    // summary is logged a little after the files are in place.
    wait_for("B's round summary", || {
        b.log()[logged_before..].contains("changes from")
    });
    assert_rounds_read_no_content(&b, logged_before);
}

#[test]
fn an_unknown_device_is_refused_and_learns_nothing() {
    let (mut a, mut c) = (Device::new(), Device::new());
    write(&a.folder, "secret.txt", b"for known peers only");
    let addr = a.start();
    // C knows A, but A does not know C.
    c.trust(&a, Some(&addr));
    c.start();
    wait_for("A to refuse C", || a.log().contains("unknown peer"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!c.folder.join("secret.txt").exists());
}

/// A client speaking the protocol by hand with B's identity.
async fn connect_as(
    device: &Device,
    to: &Device,
    addr: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let identity = Identity::load(&device.home).unwrap().unwrap();
    let target = to.id().parse().unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(tls::client_config(&identity, target).unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(tls::SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshared_folders_bad_frames_and_bad_paths_are_refused_and_others_still_served() {
    let (mut a, b) = (Device::new(), Device::new());
    a.trust(&b, None);
    fs::create_dir_all(a.folder.parent().unwrap().join("private")).unwrap();
    let private = a.folder.parent().unwrap().join("private");
    a.ok(&["folder", "add", "private", private.to_str().unwrap()]);
    write(&a.folder, "shared.txt", b"shared");
    let addr = a.start();
    // The daemon listens before its first scan ends: wait for the first round
    // of both folders, so that the shared one's changes hold `shared.txt`.
    wait_for("the first round", || {
        let folders = &a.status()["status"]["folders"];
        folders
            .as_array()
            .is_some_and(|all| all.len() == 2 && all.iter().all(|f| f["last_synced"].is_u64()))
    });
    let timeout = Duration::from_secs(20);

    // A folder not shared with B: refused.
    let mut tls = connect_as(&b, &a, &addr).await;
    say_hello(&mut tls).await;
    let theirs = protocol::read_frame(&mut tls).await.unwrap().unwrap();
    let Message::Hello { folders, .. } = theirs else {
        panic!("no hello: {theirs:?}")
    };
    let offered: Vec<&str> = folders.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(offered, vec!["docs"]);
    let ask = Message::Request {
        id: 1,
        request: Request::ChangesSince {
            folder: "private".into(),
            seq: 0,
            limit: 10,
        },
    };
    protocol::write_frame(&mut tls, &ask).await.unwrap();
    let reply = tokio::time::timeout(timeout, protocol::read_frame(&mut tls))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            reply,
            Some(Message::Response {
                id: 1,
                response: Response::Refused(_)
            })
        ),
        "{reply:?}"
    );
    // The shared one answers.
    let ask = Message::Request {
        id: 2,
        request: Request::ChangesSince {
            folder: "docs".into(),
            seq: 0,
            limit: 10,
        },
    };
    protocol::write_frame(&mut tls, &ask).await.unwrap();
    let reply = tokio::time::timeout(timeout, protocol::read_frame(&mut tls))
        .await
        .unwrap()
        .unwrap();
    let Some(Message::Response {
        id: 2,
        response: Response::Changes(entries),
    }) = reply
    else {
        panic!("{reply:?}")
    };
    assert!(entries.iter().any(|e| e.path == "shared.txt"));

    // A path with `..`: the connection is closed.
    let escape = postcard::to_stdvec(&Message::Request {
        id: 3,
        request: Request::ReadChunks {
            folder: "docs".into(),
            wanted: vec![protocol::WantedChunk {
                path: "../private/x".into(),
                content: [0; 32],
                chunk: protocol::WireChunk {
                    hash: [0; 32],
                    offset: 0,
                    len: 1,
                },
            }],
        },
    })
    .unwrap();
    send_raw(&mut tls, &escape).await;
    assert_closed(&mut tls).await;

    // Garbage, then an oversized frame, each on a new connection: closed too.
    for frame in [vec![0xff; 40], Vec::new()] {
        let mut tls = connect_as(&b, &a, &addr).await;
        say_hello(&mut tls).await;
        protocol::read_frame(&mut tls).await.unwrap();
        if frame.is_empty() {
            tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        } else {
            send_raw(&mut tls, &frame).await;
        }
        assert_closed(&mut tls).await;
    }

    // And the daemon still serves: a real peer syncs.
    let mut b = b;
    b.trust(&a, Some(&addr));
    b.start();
    wait_same(&a, &b);
    assert!(a.log().contains("not shared with it"), "{}", a.log());
    for reason in ["malformed frame", "`.` or `..`", "at most"] {
        assert!(a.log().contains(reason), "{reason}: {}", a.log());
    }
}

async fn send_raw(tls: &mut (impl tokio::io::AsyncWrite + Unpin), body: &[u8]) {
    tls.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    tls.write_all(body).await.unwrap();
}

/// The other side closed the connection (in bounded time).
async fn assert_closed(tls: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let after = tokio::time::timeout(Duration::from_secs(20), protocol::read_frame(tls))
        .await
        .expect("the connection stayed open");
    assert!(matches!(after, Ok(None) | Err(_)), "{after:?}");
}

#[test]
fn three_daemons_in_a_triangle_converge_and_agree_on_one_conflict_copy() {
    let (mut a, mut b, mut c) = (Device::new(), Device::new(), Device::new());
    a.trust(&b, None);
    a.trust(&c, None);
    let addr_a = a.start();
    b.trust(&a, Some(&addr_a));
    b.trust(&c, None);
    let addr_b = b.start();
    c.trust(&a, Some(&addr_a));
    c.trust(&b, Some(&addr_b));
    c.start();
    write(&a.folder, "shared.txt", b"v1");
    wait_same(&a, &b);
    wait_same(&a, &c);

    // Edited on two devices before either hears of the other's edit: stop B's
    // daemon, edit on A and on B, start B again.
    if let Some(mut daemon) = b.daemon.take() {
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    }
    write(&a.folder, "shared.txt", b"edited on a");
    write(&b.folder, "shared.txt", b"edited on b");
    write(&c.folder, "from_c.txt", b"c");
    std::fs::remove_file(b.home.join(latus::daemon::ADDR_FILE)).unwrap();
    b.start();
    wait_same(&a, &b);
    wait_same(&a, &c);
    let names: Vec<String> = tree(&a.folder).into_keys().collect();
    let copies: Vec<&String> = names
        .iter()
        .filter(|n| n.contains("sync-conflict"))
        .collect();
    assert_eq!(copies.len(), 1, "{names:?}");
    let kept: Vec<Vec<u8>> = tree(&a.folder).into_values().flatten().collect();
    assert!(kept.contains(&b"edited on a".to_vec()));
    assert!(kept.contains(&b"edited on b".to_vec()));
    assert!(names.contains(&"from_c.txt".to_string()));
}

#[test]
fn status_shows_the_daemon_and_sigterm_stops_it_cleanly() {
    let (mut a, b) = pair();
    let json: serde_json::Value = serde_json::from_str(&b.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["running"], true);
    wait_for("B to show A as connected", || {
        let json: serde_json::Value = serde_json::from_str(&b.ok(&["status", "--json"])).unwrap();
        json["status"]["peers"][0]["connected"] == true
            && json["status"]["folders"][0]["last_synced"].is_u64()
    });
    let text = b.ok(&["status"]);
    assert!(
        text.contains("folder docs") && text.contains("connected"),
        "{text}"
    );

    a.stop();
    assert!(!a.home.join(latus::daemon::ADDR_FILE).exists());
    let json: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["running"], false);
    assert!(a.ok(&["status"]).contains("not running"));
}

/// SIGTERM in the middle of a long first scan stops the daemon at once: it does
/// not read the rest of the folder first.
#[test]
fn sigterm_stops_a_daemon_in_the_middle_of_a_long_scan() {
    let mut a = Device::new();
    for i in 0..40 {
        write(&a.folder, &format!("f{i:02}.bin"), &bytes(1 << 20, i));
    }
    // 40 MB at 2 MB/s: the first scan would take 20 s.
    fs::write(a.home.join("config.toml"), "[scan]\nmax_read_mbps = 2\n").unwrap();
    a.start();
    wait_for("A's scan to start", || {
        a.status()["status"]["folders"][0]["state"] == "scanning"
    });
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    a.stop();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the daemon took {took:?} to stop"
    );
}

/// `latus wait`: the sequence A's `--scanned` prints is what B's `--applied`
/// waits for, and once it returns B holds the new file, without any polling of
/// B's folder. `--scanned` right after a write counts that write, even when A's
/// watcher has not read it yet. A sequence never reached times out with the reason.
#[test]
fn latus_wait_returns_once_a_change_is_applied_on_the_other_side() {
    let (a, b) = pair();
    let a_id = a.id();
    let mut last_seq = 0;
    for round in 0..6u64 {
        let name = format!("f{round}.bin");
        let content = bytes(5000 + round as usize, round);
        write(&a.folder, &name, &content);
        let seq: u64 = a
            .ok(&["wait", "docs", "--scanned", "--timeout", "60"])
            .trim()
            .parse()
            .unwrap();
        assert!(seq > last_seq, "round {round}: {seq} after {last_seq}");
        last_seq = seq;
        b.ok(&[
            "wait",
            "docs",
            "--applied",
            &format!("{a_id}:{seq}"),
            "--timeout",
            "60",
        ]);
        assert_eq!(
            fs::read(b.folder.join(&name)).ok(),
            Some(content),
            "B's `latus wait --applied {seq}` returned before {name} arrived\nB's log:\n{}",
            b.log()
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&a.ok(&["wait", "docs", "--json", "--timeout", "60"])).unwrap();
    assert_eq!(json["folder"], "docs");
    assert!(json["seq"].as_u64() >= Some(last_seq), "{json}");

    let out = b.run(&[
        "wait",
        "docs",
        "--applied",
        &format!("{a_id}:999999"),
        "--timeout",
        "0.3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The reason is the folder's state then: idle, or a round that rescans
    // what B itself just wrote (it can still run on a loaded machine).
    assert!(
        ["idle", "scanning"]
            .iter()
            .any(|state| stderr.contains(&format!("folder docs not in sync after 0.3 s ({state})"))),
        "{stderr}"
    );
    let out = b.run(&["wait", "nope", "--timeout", "0.1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the daemon has no such folder"),
        "{out:?}"
    );
    let idle = Device::new();
    let out = idle.run(&["wait", "docs", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("latus serve is not running"),
        "{out:?}"
    );
}

/// A file of `size` incompressible bytes, written in pieces.
fn write_big(path: &Path, size: usize, seed: &[u8]) {
    use std::io::Write;
    let mut reader = blake3::Hasher::new().update(seed).finalize_xof();
    let mut out = std::io::BufWriter::new(fs::File::create(path).unwrap());
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..size / piece.len() {
        reader.fill(&mut piece);
        out.write_all(&piece).unwrap();
    }
    out.flush().unwrap();
}

fn file_hash(path: &Path) -> Option<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs::File::open(path).ok()?).ok()?;
    Some(hasher.finalize())
}

/// The size of the largest file in B's partial directory.
fn largest_partial(device: &Device) -> u64 {
    fs::read_dir(device.folder.join(".latus/partial"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[test]
fn a_daemon_killed_mid_transfer_resumes_and_does_not_fetch_everything_again() {
    const SIZE: u64 = 500 << 20;
    let (mut a, mut b) = (Device::new(), Device::new());
    write_big(&a.folder.join("big.bin"), SIZE as usize, b"resume");
    a.trust(&b, None);
    let addr = a.start();
    b.trust(&a, Some(&addr));
    b.start();
    let start = Instant::now();
    while largest_partial(&b) < SIZE / 4 {
        assert!(start.elapsed() < 4 * WAIT, "the transfer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `latus status` shows what is left (the file is placed only when whole).
    let folder = &b.status()["status"]["folders"][0];
    assert_eq!(folder["state"], "syncing", "{folder}");
    assert_eq!(folder["files_left"], 1, "{folder}");
    assert_eq!(folder["bytes_left"], SIZE, "{folder}");
    let shown = b.ok(&["status"]);
    assert!(
        shown.contains("syncing, 1 change / 500.00 MiB left"),
        "{shown}"
    );
    // kill -9 in the middle of the transfer.
    let mut daemon = b.daemon.take().unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let kept = largest_partial(&b);
    assert!(kept < SIZE, "the transfer finished before the kill");
    assert!(
        !b.folder.join("big.bin").exists(),
        "a partial file at the final path"
    );

    let logged_before = b.log().len();
    b.start();
    let expected = file_hash(&a.folder.join("big.bin"));
    let start = Instant::now();
    while file_hash(&b.folder.join("big.bin")) != expected {
        assert!(start.elapsed() < 4 * WAIT, "the transfer did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The round's summary is logged once the round is over, a little after
    // the file is in place.
    wait_for("the round's summary in B's log", || {
        b.log()[logged_before..].contains("changes from")
    });
    let since = b.log()[logged_before..].to_string();
    let line = since
        .lines()
        .find(|l| l.contains("changes from"))
        .unwrap_or_else(|| panic!("{since}"));
    let number = |before: &str| -> u64 {
        let end = line.find(before).unwrap();
        line[..end]
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (fetched, resumed) = (number(" bytes read"), number(" bytes resumed"));
    // All that was written before the kill but the last windows, whose record
    // in the chunk store the kill may have cut off (two windows of at most 16
    // chunks of at most 256 KiB).
    assert!(resumed + (8 << 20) >= kept, "{line}, {kept} bytes kept");
    assert!(fetched <= SIZE - resumed, "{line}");
    assert_eq!(fetched + resumed, SIZE, "{line}");
    eprintln!("after the restart: {line}");
}

#[test]
fn a_file_two_peers_hold_is_fetched_from_both() {
    const SIZE: usize = 128 << 20;
    let (mut a, mut b, mut c) = (Device::new(), Device::new(), Device::new());
    write_big(&a.folder.join("big.bin"), SIZE, b"two sources");
    write_big(&c.folder.join("big.bin"), SIZE, b"two sources");
    a.trust(&b, None);
    a.trust(&c, None);
    let addr_a = a.start();
    c.trust(&a, Some(&addr_a));
    c.trust(&b, None);
    let addr_c = c.start();
    let expected = file_hash(&a.folder.join("big.bin"));
    wait_for("A and C to record the file", || {
        a.recorded("big.bin").is_some() && c.recorded("big.bin").is_some()
    });
    b.trust(&a, Some(&addr_a));
    b.trust(&c, Some(&addr_c));
    b.start();
    let start = Instant::now();
    while file_hash(&b.folder.join("big.bin")) != expected {
        assert!(start.elapsed() < 4 * WAIT, "the transfer did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The round's summary names the bytes read from each peer.
    wait_for("the round's summary in B's log", || {
        b.log().contains("changes from")
    });
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("changes from"))
        .unwrap_or_else(|| panic!("{log}"));
    let (_, sources) = line
        .split_once(" bytes read (")
        .unwrap_or_else(|| panic!("read from one peer only: {line}"));
    let each: Vec<u64> = sources
        .split(", ")
        .filter_map(|source| source.split_once(" from ")?.0.parse().ok())
        .collect();
    // How the bytes split follows each peer's pace, which on one machine
    // follows how the three daemons share its cores.
    assert_eq!(each.len(), 2, "{line}");
    assert!(each.iter().all(|&bytes| bytes > 0), "{line}");
    assert_eq!(each.iter().sum::<u64>(), SIZE as u64, "{line}");
}

/// The changes the daemon's rounds applied so far, from its log.
fn changes_logged(device: &Device) -> u64 {
    device
        .log()
        .lines()
        .filter_map(|line| {
            let (_, round) = line.split_once("folder docs: ")?;
            round.split_once(" changes from")?.0.parse::<u64>().ok()
        })
        .sum()
}

/// B's rounds logged since `logged_before` (at least one) read no content.
fn assert_rounds_read_no_content(b: &Device, logged_before: usize) {
    let since = b.log()[logged_before..].to_string();
    let rounds: Vec<&str> = since
        .lines()
        .filter(|l| l.contains("changes from"))
        .collect();
    assert!(!rounds.is_empty(), "{since}");
    assert!(
        rounds.iter().all(|l| l.contains(", 0 bytes read")),
        "{since}"
    );
}

#[test]
fn a_renamed_directory_of_thousands_of_files_sends_no_content() {
    let (a, b) = pair();
    for i in 0..2000 {
        write(
            &a.folder,
            &format!("album/track{i:04}.bin"),
            &bytes(2000 + i, i as u64),
        );
    }
    wait_same(&a, &b);
    // The last round's line is logged after its last file is placed.
    wait_for("B to log the whole first sync", || {
        changes_logged(&b) >= 2001
    });
    let logged_before = b.log().len();
    fs::rename(a.folder.join("album"), a.folder.join("album-renamed")).unwrap();
    wait_same(&a, &b);
    assert_rounds_read_no_content(&b, logged_before);
}

#[test]
fn the_daemon_also_logs_to_a_rotated_file_in_the_data_dir_at_the_same_level() {
    let mut a = Device::new();
    a.start();
    wait_for("the first round", || a.last_synced().is_some());
    // The watcher traces each event: not at `--log-level info`.
    write(&a.folder, "new.txt", b"seen by the watcher");
    wait_for("the watcher's round", || a.recorded("new.txt").is_some());
    a.stop();

    let dir = a.home.join(latus::daemon::LOG_DIR);
    let current = dir.join(latus::daemon::LOG_FILE);
    let log = fs::read_to_string(&current).unwrap_or_else(|e| panic!("{}: {e}", current.display()));
    assert!(log.contains("listening on 127.0.0.1:"), "{log}");
    // Written last, before the exit: the file is flushed on a clean stop.
    assert!(log.contains("stopping"), "{log}");
    assert!(!log.contains("watched:"), "{log}");
    // The console log is still there.
    assert!(a.log().contains("listening on"), "{}", a.log());
    // `latus.log` is the link to the dated file the appender rotates.
    let dated: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("latus.log."))
        .collect();
    assert_eq!(dated.len(), 1, "{dated:?}");
}

/// Overwrites the start of `path` through a shared memory map: the file changes
/// (and its mtime), but inotify reports no modification.
fn write_through_mmap(path: &Path, new_start: &[u8]) {
    use std::os::fd::AsRawFd;
    let file = fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = file.metadata().unwrap().len() as usize;
    assert!(new_start.len() <= len);
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, written
    // within its bounds, then synced and unmapped; nothing else maps it.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(new_start.as_ptr(), map.cast::<u8>(), new_start.len());
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(map, len), 0);
    }
}

/// Sends `request` and waits for its answer, passing over other messages.
async fn ask(
    tls: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    id: u64,
    request: Request,
) -> Response {
    protocol::write_frame(tls, &Message::Request { id, request })
        .await
        .unwrap();
    loop {
        let frame = tokio::time::timeout(WAIT, protocol::read_frame(tls))
            .await
            .expect("no answer")
            .unwrap();
        match frame {
            Some(Message::Response { id: got, response }) if got == id => return response,
            Some(_) => {}
            None => panic!("the connection closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_the_disk_no_longer_holds_is_not_served_and_the_folder_is_rescanned() {
    let (mut a, b) = (Device::new(), Device::new());
    a.trust(&b, None);
    // Below the smallest chunk: the content is one chunk, with the content's hash.
    let old = bytes(4000, 7);
    write(&a.folder, "f.bin", &old);
    let addr = a.start();
    wait_for("the first round", || a.last_synced().is_some());
    // A round runs when a peer connects, and it would find the change by its
    // stat: the change must come after that round. It is told by last_synced,
    // in seconds: connect in a later second than the first round's.
    let first = a.last_synced().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    while now() <= first {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut tls = connect_as(&b, &a, &addr).await;
    say_hello(&mut tls).await;
    protocol::read_frame(&mut tls).await.unwrap().unwrap();
    wait_for("the round after the connection", || {
        a.last_synced().is_some_and(|t| t > first)
    });

    let read_chunk = Request::ReadChunks {
        folder: "docs".into(),
        wanted: vec![protocol::WantedChunk {
            path: "f.bin".into(),
            content: *blake3::hash(&old).as_bytes(),
            chunk: protocol::WireChunk {
                hash: *blake3::hash(&old).as_bytes(),
                offset: 0,
                len: old.len() as u32,
            },
        }],
    };
    let answer = ask(&mut tls, 1, read_chunk.clone()).await;
    assert_eq!(answer, Response::ChunkData(vec![Some(old.clone().into())]));

    // Changed where the watcher cannot see it; the daemon rescans only hourly.
    let new_start = b"changed behind the watcher's back";
    write_through_mmap(&a.folder.join("f.bin"), new_start);
    let mut new = old.clone();
    new[..new_start.len()].copy_from_slice(new_start);
    assert_eq!(fs::read(a.folder.join("f.bin")).unwrap(), new);
    let answer = ask(&mut tls, 2, read_chunk).await;
    assert_eq!(answer, Response::ChunkData(vec![None]));

    // The refusal made the daemon rescan: its history now has the new content.
    let start = Instant::now();
    while a.recorded("f.bin") != Some(latus::content::Hash::of(&new)) {
        assert!(
            start.elapsed() < WAIT,
            "the change was not rescanned:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A first scan shows each batch it commits to the peers connected at that
/// moment, including one that connected after the scan began: it syncs while
/// the scan goes on. (The daemon also honours the `[scan]` read limit of
/// `config.toml`, which makes this scan last seconds.)
#[test]
fn a_peer_that_connects_during_a_first_scan_syncs_before_the_scan_ends() {
    let (mut a, mut b) = (Device::new(), Device::new());
    // 4 files read at 0.5 MB/s: a scan of about 3.2 s.
    for name in ["a.bin", "b.bin", "c.bin", "d.bin"] {
        write(&a.folder, name, &bytes(400_000, name.as_bytes()[0] as u64));
    }
    fs::write(a.home.join("config.toml"), "[scan]\nmax_read_mbps = 0.5\n").unwrap();
    a.trust(&b, None);
    let addr = a.start();
    b.trust(&a, Some(&addr));
    b.start();
    let scanning = |a: &Device| a.status()["status"]["folders"][0]["state"] == "scanning";
    assert!(
        scanning(&a),
        "A's first scan was over before B started: {}",
        a.status()
    );
    let start = Instant::now();
    let synced = loop {
        let synced: Vec<String> = ["a.bin", "b.bin", "c.bin", "d.bin"]
            .into_iter()
            .filter(|name| {
                fs::read(b.folder.join(name))
                    .is_ok_and(|got| got == bytes(400_000, name.as_bytes()[0] as u64))
            })
            .map(String::from)
            .collect();
        if !synced.is_empty() || start.elapsed() > WAIT {
            break synced;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !synced.is_empty() && scanning(&a),
        "B had {synced:?} once A's scan was over:\n{}\n{}",
        a.log(),
        b.log()
    );
    wait_same(&a, &b);
}
