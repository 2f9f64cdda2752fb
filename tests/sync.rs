//! Scenario tests of the reconciliation engine through `latus::sync::sync`: two
//! real folders, real files, each with its own history.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{backdate, bytes, files, trashed, tree, write, write_files};
use latus::chunk_store::ChunkStore;
use latus::content::Hash;
use latus::diff;
use latus::folder::Folder;
use latus::history::{HistoryStore, Kind};
use latus::merge::{self, MergeOptions};
use latus::peer::{FolderPeer, Peer};
use latus::sync::{SyncOptions, SyncReport, exchange, sync};
use latus::{Error, scan};

struct Pair {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Pair {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        Pair { _dir: dir, a, b }
    }

    fn sync(&self) -> SyncReport {
        self.sync_with(&SyncOptions::default()).unwrap()
    }

    fn sync_with(&self, options: &SyncOptions) -> latus::Result<SyncReport> {
        sync(&self.a, &self.b, options)
    }

    /// Syncs and checks the outcome every sync must have: identical trees.
    /// Scans A and plans B's side of a sync, without applying it: B's folder,
    /// history, A as its peer, and the plan.
    fn plan_b_by_hand(&self) -> (Folder, HistoryStore, FolderPeer, diff::Plan) {
        let (fb, _, mut sb, peer_a) = self.scan_a_open_b();
        exchange(&mut sb, &peer_a).unwrap();
        let plan = diff::plan(&sb, &peer_a.id()).unwrap();
        (fb, sb, peer_a, plan)
    }

    /// Scans A and opens B: B's folder, A's and B's histories, A as B's peer.
    fn scan_a_open_b(&self) -> (Folder, HistoryStore, HistoryStore, FolderPeer) {
        let (fa, fb) = (
            Folder::open_or_create(&self.a).unwrap(),
            Folder::open_or_create(&self.b).unwrap(),
        );
        let mut sa = HistoryStore::open(&fa.history_path()).unwrap();
        let sb = HistoryStore::open(&fb.history_path()).unwrap();
        let replica_a = sa.replica_id().unwrap();
        scan::scan(&fa, &mut sa, replica_a, &Default::default()).unwrap();
        (fb, sa, sb, FolderPeer::open(&fa).unwrap())
    }

    fn converge(&self) -> SyncReport {
        let report = self.sync();
        assert!(report.identical, "{:?}", report.differences);
        assert_eq!(tree(&self.a), tree(&self.b));
        report
    }
}

/// A folder peer as the engine sees it, watched: it answers at most `at_most`
/// history entries at a time, as a network peer does (5,000), counts the
/// chunks it is asked to read one by one (beside the runs it copies unread),
/// and logs when the merger asks for chunks together and when it waits for
/// them ("ask OFFSET", "wait OFFSET", by the offset of the first).
struct WatchedPeer<'a> {
    peer: &'a FolderPeer,
    at_most: usize,
    chunk_reads: AtomicUsize,
    /// Chunks it sends before it has none to send any more (as a peer that
    /// goes away).
    chunks_left: AtomicUsize,
    asks: std::sync::Mutex<Vec<String>>,
}

impl<'a> WatchedPeer<'a> {
    fn new(peer: &'a FolderPeer, at_most: usize) -> Self {
        WatchedPeer {
            peer,
            at_most,
            chunk_reads: AtomicUsize::new(0),
            chunks_left: AtomicUsize::new(usize::MAX),
            asks: Default::default(),
        }
    }

    fn sending_at_most(self, chunks: usize) -> Self {
        self.chunks_left.store(chunks, Ordering::Relaxed);
        self
    }
}

impl Peer for WatchedPeer<'_> {
    fn id(&self) -> latus::device::PeerId {
        self.peer.id()
    }
    fn changes_since(&self, seq: u64, limit: usize) -> latus::Result<Vec<latus::history::Entry>> {
        self.peer.changes_since(seq, limit.min(self.at_most))
    }
    fn chunks_of(&self, content: &Hash) -> latus::Result<Vec<latus::content::ChunkInfo>> {
        self.peer.chunks_of(content)
    }
    fn read_chunk(
        &self,
        path: &str,
        content: &Hash,
        chunk: &latus::content::ChunkInfo,
    ) -> latus::Result<Option<Vec<u8>>> {
        self.chunk_reads.fetch_add(1, Ordering::Relaxed);
        let left = self.chunks_left.load(Ordering::Relaxed);
        if left == 0 {
            return Ok(None);
        }
        self.chunks_left.store(left - 1, Ordering::Relaxed);
        self.peer.read_chunk(path, content, chunk)
    }
    fn ask_for_chunks<'p>(
        &'p self,
        path: &str,
        content: &Hash,
        chunks: &[latus::content::ChunkInfo],
    ) -> latus::peer::AskedChunks<'p> {
        let first = chunks.first().map_or(0, |chunk| chunk.offset);
        let note = move |what: &str| self.asks.lock().unwrap().push(format!("{what} {first}"));
        note("ask");
        let answers: latus::Result<Vec<_>> = chunks
            .iter()
            .map(|chunk| self.read_chunk(path, content, chunk))
            .collect();
        Box::new(move || {
            note("wait");
            answers
        })
    }
    fn copy_unread(
        &self,
        path: &str,
        content: &Hash,
        bytes: std::ops::Range<u64>,
        output: &fs::File,
        output_path: &std::path::Path,
    ) -> latus::Result<bool> {
        self.peer
            .copy_unread(path, content, bytes, output, output_path)
    }
}

/// An exchange asks again until the peer has nothing more, not until an answer
/// is shorter than what it asked for: a round took only the first 5,000 of a
/// network peer's entries, and the rest waited for something else to wake it.
#[test]
fn an_exchange_receives_every_entry_of_a_peer_that_answers_in_small_batches() {
    let p = Pair::new();
    for i in 0..25 {
        write(
            &p.a,
            &format!("d{}/f{i}.txt", i % 3),
            format!("file {i}").as_bytes(),
        );
    }
    let (_, sa, mut sb, peer) = p.scan_a_open_b();
    let capped = WatchedPeer::new(&peer, 4);
    latus::sync::exchange_with(&mut sb, &capped, None).unwrap();
    assert_eq!(
        sb.remote_state(&peer.id()).unwrap().map(|(seq, _)| seq),
        Some(sa.last_seq().unwrap())
    );
    let plan = diff::plan(&sb, &peer.id()).unwrap();
    let files = plan.actions.iter().filter(|a| a.target.kind == Kind::File);
    assert_eq!(files.count(), 25);
}

#[test]
fn a_first_sync_copies_one_sided_files_and_keeps_both_sides_of_a_difference() {
    let p = Pair::new();
    write(&p.a, "only-a/x.txt", b"from a");
    write(&p.b, "only-b.txt", b"from b");
    let shared = bytes(300_000, 1);
    write(&p.a, "same.bin", &shared);
    write(&p.b, "same.bin", &shared);
    write(&p.a, "differs.txt", b"version a");
    write(&p.b, "differs.txt", b"version b");

    let report = p.converge();
    // Identical content is not transferred: only the one-sided files and the
    // losing version of the difference travel.
    let moved = report.a.bytes_fetched + report.b.bytes_fetched;
    assert!(moved < 100, "{moved} bytes read from the other side");
    assert_eq!(report.conflicts.len(), 1, "{:?}", report.conflicts);
    let conflict = &report.conflicts[0];
    assert_eq!(conflict.path, "differs.txt");
    assert!(
        conflict.copy_path.starts_with("differs.sync-conflict-")
            && conflict.copy_path.ends_with(".txt"),
        "{}",
        conflict.copy_path
    );
    let on_a = files(&p.a);
    let kept: Vec<&[u8]> = vec![&on_a["differs.txt"], &on_a[&conflict.copy_path]];
    assert!(kept.contains(&&b"version a"[..]) && kept.contains(&&b"version b"[..]));
    assert_eq!(on_a["only-b.txt"], b"from b");
    assert_eq!(files(&p.b)["only-a/x.txt"], b"from a");

    // A second sync has nothing to do and creates no more conflict copies.
    let again = p.converge();
    assert!(again.actions.is_empty(), "{:?}", again.actions);
    assert!(again.conflicts.is_empty());
}

#[test]
fn concurrent_edits_give_one_conflict_copy_with_the_same_name_on_both_sides() {
    let p = Pair::new();
    write(&p.a, "report.txt", b"base");
    p.converge();
    write(&p.a, "report.txt", b"edited on a");
    write(&p.b, "report.txt", b"edited on b, longer");
    let report = p.converge();
    assert_eq!(report.conflicts.len(), 1);
    let names: Vec<String> = files(&p.a).into_keys().collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names, files(&p.b).into_keys().collect::<Vec<_>>());
    let contents: Vec<Vec<u8>> = files(&p.a).into_values().collect();
    assert!(contents.contains(&b"edited on a".to_vec()));
    assert!(contents.contains(&b"edited on b, longer".to_vec()));
}

#[test]
fn an_edit_wins_over_a_deletion_and_comes_back() {
    let p = Pair::new();
    write(&p.a, "keep.txt", b"v1");
    write(&p.a, "other.txt", b"x");
    p.converge();
    fs::remove_file(p.a.join("keep.txt")).unwrap();
    write(&p.b, "keep.txt", b"v2, edited");
    let report = p.converge();
    assert!(report.conflicts.is_empty());
    assert_eq!(files(&p.a)["keep.txt"], b"v2, edited");
}

#[test]
fn a_rename_and_an_edit_of_its_source_both_survive() {
    let p = Pair::new();
    write(&p.a, "old.txt", b"original");
    p.converge();
    fs::rename(p.a.join("old.txt"), p.a.join("new.txt")).unwrap();
    write(&p.b, "old.txt", b"edited meanwhile");
    p.converge();
    let on_b = files(&p.b);
    assert_eq!(on_b["new.txt"], b"original");
    assert_eq!(on_b["old.txt"], b"edited meanwhile");
}

#[test]
fn a_renamed_directory_of_2000_files_is_moved_without_reading_content() {
    let p = Pair::new();
    for i in 0..2000 {
        write(
            &p.a,
            &format!("photos/{i:04}.jpg"),
            &bytes(100 + i % 700, i as u64),
        );
    }
    p.converge();
    fs::rename(p.a.join("photos"), p.a.join("pictures")).unwrap();
    let report = p.converge();
    assert_eq!(
        report.b.bytes_fetched, 0,
        "content was read from the other side"
    );
    assert_eq!(
        report.b.bytes_local, 0,
        "content was copied instead of moved"
    );
    let moves = report.actions.iter().filter(|a| a.op == "move").count();
    assert_eq!(moves, 2000);
    assert_eq!(files(&p.b).len(), 2000);
}

#[test]
fn identical_changes_on_both_sides_are_no_conflict() {
    let p = Pair::new();
    write(&p.a, "f.txt", b"base");
    p.converge();
    write(&p.a, "f.txt", b"same new content");
    write(&p.b, "f.txt", b"same new content");
    write(&p.a, "new.txt", b"created twice");
    write(&p.b, "new.txt", b"created twice");
    let report = p.converge();
    assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    assert_eq!(report.a.bytes_fetched + report.b.bytes_fetched, 0);
}

#[test]
fn type_changes_travel_both_ways() {
    let p = Pair::new();
    write(&p.a, "was-file", b"file");
    write(&p.a, "was-dir/inner.txt", b"inner");
    write(&p.a, "was-link-target", b"t");
    symlink("was-link-target", p.a.join("was-link")).unwrap();
    p.converge();

    fs::remove_file(p.a.join("was-file")).unwrap();
    write(&p.a, "was-file/now-inside.txt", b"now a dir");
    fs::remove_dir_all(p.a.join("was-dir")).unwrap();
    write(&p.a, "was-dir", b"now a file");
    fs::remove_file(p.b.join("was-link")).unwrap();
    write(&p.b, "was-link", b"link became a file");
    p.converge();
    let on_b = tree(&p.b);
    assert_eq!(on_b["was-file"].0, Kind::Dir);
    assert_eq!(on_b["was-dir"].0, Kind::File);
    assert_eq!(files(&p.a)["was-link"], b"link became a file");
    // The replaced versions are in the trash, not lost.
    assert!(trashed(&p.b).contains(&b"file".to_vec()));
    assert!(trashed(&p.b).contains(&b"inner".to_vec()));
}

#[test]
fn a_file_against_a_directory_keeps_the_directory_and_the_file_as_a_copy() {
    let p = Pair::new();
    write(&p.a, "x/inside.txt", b"in a dir");
    write(&p.b, "x", b"a file");
    let report = p.converge();
    assert_eq!(report.conflicts.len(), 1);
    let on_a = files(&p.a);
    assert_eq!(on_a["x/inside.txt"], b"in a dir");
    assert_eq!(on_a[&report.conflicts[0].copy_path], b"a file");
}

#[test]
fn metadata_changes_are_synced_without_content() {
    let p = Pair::new();
    write(&p.a, "script.sh", b"#!/bin/sh\n");
    p.converge();
    fs::set_permissions(p.a.join("script.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let report = p.converge();
    assert_eq!(report.b.bytes_fetched, 0);
    let mode = fs::metadata(p.b.join("script.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn new_files_get_exactly_their_modes_whatever_the_umask_would_strip() {
    let p = Pair::new();
    // 0o666 and 0o777 lose bits to the usual umask (022) when a file is
    // created with them; 0o444 cannot be written once made.
    let modes = [0o644, 0o666, 0o777, 0o444, 0o600];
    for mode in modes {
        let name = format!("m{mode:o}");
        write(&p.a, &name, name.as_bytes());
        fs::set_permissions(p.a.join(&name), fs::Permissions::from_mode(mode)).unwrap();
    }
    p.converge();
    for mode in modes {
        let name = format!("m{mode:o}");
        let meta = fs::metadata(p.b.join(&name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        assert_eq!(fs::read(p.b.join(&name)).unwrap(), name.as_bytes());
    }
}

#[test]
fn an_append_reuses_the_chunks_already_here() {
    let p = Pair::new();
    let mut content = bytes(4 << 20, 7);
    write(&p.a, "big.bin", &content);
    p.converge();
    content.extend(bytes(1 << 20, 8));
    write(&p.a, "big.bin", &content);
    let report = p.converge();
    // Only the appended MiB and the chunk(s) around the old end travel.
    assert!(
        report.b.bytes_fetched < (1 << 20) + 2 * 256 * 1024,
        "fetched {}",
        report.b.bytes_fetched
    );
    assert!(report.b.bytes_local >= (4 << 20) - 256 * 1024);
    assert_eq!(files(&p.b)["big.bin"], content);
    assert!(trashed(&p.b).contains(&content[..4 << 20].to_vec()));
}

#[test]
fn a_local_chunk_source_that_changed_unseen_is_not_trusted() {
    let p = Pair::new();
    let old = bytes(4 << 20, 11);
    write(&p.a, "old.bin", &old);
    p.converge();
    let mut new = old.clone();
    new.extend(bytes(1 << 20, 12));
    write(&p.a, "new.bin", &new);
    // Plan B's side by hand, then change B's old.bin behind the same size and
    // mtime: its chunks are no longer what B's history says they are.
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    assert_eq!(plan.actions.len(), 1);
    let old_path = p.b.join("old.bin");
    let mtime = fs::metadata(&old_path).unwrap().modified().unwrap();
    let mut changed = old.clone();
    changed[1 << 20] ^= 0xff;
    fs::write(&old_path, &changed).unwrap();
    fs::File::options()
        .write(true)
        .open(&old_path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let merged = merge::apply(&fb, &mut sb, &peer_a, plan, &MergeOptions::default()).unwrap();
    assert_eq!(merged.applied, 1);
    assert_eq!(files(&p.b)["new.bin"], new);
    // The appended MiB and the changed chunk came from A; the rest from old.bin.
    assert!(merged.bytes_fetched > 1 << 20, "{}", merged.bytes_fetched);
    assert!(merged.bytes_fetched < (1 << 20) + 3 * 256 * 1024);
}

/// Scans A, whose `big.bin` (4 MiB, many chunks) B lacks, and applies B's
/// plan through a [`WatchedPeer`], after `meanwhile` ran on A's file.
fn apply_big_file_to_b(
    p: &Pair,
    content: &[u8],
    meanwhile: impl FnOnce(&std::path::Path),
) -> (merge::MergeReport, usize) {
    write(&p.a, "big.bin", content);
    // Not modified within the scan's racy window: its stat alone vouches for it.
    backdate(&p.a);
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    assert_eq!(plan.actions.len(), 1);
    meanwhile(&p.a.join("big.bin"));
    let watched = WatchedPeer::new(&peer_a, usize::MAX);
    let merged = merge::apply(&fb, &mut sb, &watched, plan, &MergeOptions::default()).unwrap();
    (merged, watched.chunk_reads.load(Ordering::Relaxed))
}

#[test]
fn a_file_of_a_local_peer_unchanged_since_its_scan_is_copied_unread() {
    let p = Pair::new();
    let content = bytes(4 << 20, 31);
    let (merged, chunks_read) = apply_big_file_to_b(&p, &content, |_| {});
    assert_eq!(merged.applied, 1);
    assert_eq!(files(&p.b)["big.bin"], content);
    assert_eq!(merged.bytes_fetched, 4 << 20);
    assert_eq!(chunks_read, 0, "no chunk was read and hashed one by one");
}

#[test]
fn a_file_of_a_local_peer_changed_unseen_since_its_scan_is_not_copied_unread() {
    let p = Pair::new();
    let content = bytes(4 << 20, 32);
    let mut changed = content.clone();
    changed[3 << 20] ^= 0xff;
    // Rewritten in place with the same size and mtime: only its ctime tells.
    let (merged, chunks_read) = apply_big_file_to_b(&p, &content, |path| {
        let mtime = fs::metadata(path).unwrap().modified().unwrap();
        fs::write(path, &changed).unwrap();
        let file = fs::File::options().write(true).open(path).unwrap();
        file.set_modified(mtime).unwrap();
    });
    assert!(chunks_read > 0);
    // The changed chunk is not the one announced: nothing is placed under a
    // hash its bytes do not have, and the path waits for the next round.
    assert_eq!(merged.applied, 0);
    assert_eq!(merged.deferred, ["big.bin"]);
    assert!(!p.b.join("big.bin").exists());
    let report = p.converge();
    assert_eq!(files(&p.b)["big.bin"], changed);
    assert!(report.identical);
}

/// A resumable build (the daemon's) keeps the peer busy: it asks for the
/// chunks of its next window before it waits for those of the current one and
/// writes them, so a window is always on its way while the other is written.
#[test]
fn a_resumable_build_asks_for_the_next_chunks_before_it_waits_for_the_ones_before() {
    let p = Pair::new();
    let content = bytes(4 << 20, 33);
    write(&p.a, "big.bin", &content);
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    let logging = WatchedPeer::new(&peer_a, usize::MAX);
    let options = MergeOptions {
        resumable: true,
        ..Default::default()
    };
    let merged = merge::apply(&fb, &mut sb, &logging, plan, &options).unwrap();
    assert_eq!(merged.applied, 1);
    assert_eq!(merged.bytes_fetched, 4 << 20);
    assert_eq!(files(&p.b)["big.bin"], content);

    let log = logging.asks.into_inner().unwrap();
    let windows: Vec<&str> = log.iter().filter_map(|l| l.strip_prefix("ask ")).collect();
    assert!(windows.len() >= 3, "{log:?}");
    // ask 1st, ask 2nd, wait 1st, ask 3rd, wait 2nd, ..., wait last.
    let mut expected = vec![format!("ask {}", windows[0])];
    for pair in windows.windows(2) {
        expected.push(format!("ask {}", pair[1]));
        expected.push(format!("wait {}", pair[0]));
    }
    expected.push(format!("wait {}", windows[windows.len() - 1]));
    assert_eq!(log, expected);
}

/// A resumable build whose peer goes away part way keeps the chunks it got,
/// recorded in the chunk store; the next build asks only for the others, and
/// for a chunk recorded complete whose bytes the partial file lost.
#[test]
fn a_resumable_build_cut_short_later_asks_only_for_what_its_partial_file_lacks() {
    let p = Pair::new();
    let content = bytes(4 << 20, 34);
    let hash = common::content_hash(&content);
    write(&p.a, "big.bin", &content);
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    let options = MergeOptions {
        resumable: true,
        ..Default::default()
    };
    let cut_short = WatchedPeer::new(&peer_a, usize::MAX).sending_at_most(20);
    let merged = merge::apply(&fb, &mut sb, &cut_short, plan, &options).unwrap();
    assert_eq!(merged.applied, 0);
    assert_eq!(merged.deferred, ["big.bin"]);
    assert!(!p.b.join("big.bin").exists());
    let chunk_store = ChunkStore::open(&fb.marker_dir()).unwrap();
    let complete = chunk_store.complete(&hash).unwrap();
    assert_eq!(complete, (0..20).collect());

    // The first chunk's bytes are lost, its record kept (as a power loss may).
    let partial = fb.marker_dir().join(merge::PARTIAL_DIR).join(hash.to_hex());
    let file = fs::File::options().write(true).open(&partial).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0; 100], 0).unwrap();

    let plan = diff::plan(&sb, &peer_a.id()).unwrap();
    let watched = WatchedPeer::new(&peer_a, usize::MAX);
    let merged = merge::apply(&fb, &mut sb, &watched, plan, &options).unwrap();
    assert_eq!(merged.applied, 1);
    assert_eq!(files(&p.b)["big.bin"], content);
    let chunks = peer_a.chunks_of(&hash).unwrap();
    let resumed: u64 = chunks[1..20].iter().map(|c| u64::from(c.len)).sum();
    assert_eq!(merged.bytes_resumed, resumed);
    assert_eq!(merged.bytes_fetched, (4 << 20) - resumed);
    assert_eq!(
        watched.chunk_reads.load(Ordering::Relaxed),
        chunks.len() - 19
    );
    // Placed: its partial file and its records are gone.
    assert!(!partial.exists());
    assert!(chunk_store.complete(&hash).unwrap().is_empty());
}

/// A newer version of a path replaces the older work for it: the partial file
/// of the version it replaces goes as soon as the newer one's build starts.
#[test]
fn a_newer_version_of_a_path_replaces_the_partial_file_of_the_older_at_once() {
    let p = Pair::new();
    let options = MergeOptions {
        resumable: true,
        ..Default::default()
    };
    let partial_of = |fb: &Folder, content: &[u8]| {
        let hash = common::content_hash(content);
        (
            fb.marker_dir().join(merge::PARTIAL_DIR).join(hash.to_hex()),
            hash,
        )
    };
    let (v1, v2) = (bytes(4 << 20, 35), bytes(4 << 20, 36));
    write(&p.a, "big.bin", &v1);
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    let cut_short = WatchedPeer::new(&peer_a, usize::MAX).sending_at_most(20);
    merge::apply(&fb, &mut sb, &cut_short, plan, &options).unwrap();
    let (partial_v1, hash_v1) = partial_of(&fb, &v1);
    assert!(partial_v1.exists());
    drop((fb, sb, peer_a));

    write(&p.a, "big.bin", &v2);
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    let cut_short = WatchedPeer::new(&peer_a, usize::MAX).sending_at_most(20);
    let merged = merge::apply(&fb, &mut sb, &cut_short, plan, &options).unwrap();
    assert_eq!(merged.deferred, ["big.bin"]);
    let (partial_v2, hash_v2) = partial_of(&fb, &v2);
    assert!(partial_v2.exists());
    assert!(!partial_v1.exists());
    let chunk_store = ChunkStore::open(&fb.marker_dir()).unwrap();
    assert!(chunk_store.complete(&hash_v1).unwrap().is_empty());
    assert_eq!(chunk_store.complete(&hash_v2).unwrap().len(), 20);
}

#[test]
fn a_moved_file_is_renamed_not_copied_and_a_copied_one_is_copied_locally() {
    let p = Pair::new();
    write(&p.a, "a.bin", &bytes(1 << 20, 1));
    write(&p.a, "b.bin", &bytes(1 << 20, 2));
    p.converge();
    fs::rename(p.a.join("a.bin"), p.a.join("moved.bin")).unwrap();
    fs::copy(p.a.join("b.bin"), p.a.join("copy.bin")).unwrap();
    let report = p.converge();
    assert_eq!(report.b.bytes_fetched, 0);
    assert_eq!(report.b.bytes_local, 1 << 20, "only the copy is written");
    let ops: Vec<&str> = report.actions.iter().map(|a| a.op).collect();
    assert!(ops.contains(&"move") && ops.contains(&"copy"), "{ops:?}");
}

#[test]
fn a_local_edit_not_yet_scanned_is_never_overwritten() {
    let p = Pair::new();
    write(&p.a, "doc.txt", b"v1");
    p.converge();
    write(&p.a, "doc.txt", b"v2 from a");
    // Plan B's side by hand, then edit B's file before the plan is applied.
    let (fb, mut sb, peer_a, plan) = p.plan_b_by_hand();
    assert_eq!(plan.actions.len(), 1);
    write(&p.b, "doc.txt", b"v2 from b, unscanned");
    let merged = merge::apply(&fb, &mut sb, &peer_a, plan, &MergeOptions::default()).unwrap();
    assert_eq!(merged.deferred, vec!["doc.txt".to_string()]);
    assert_eq!(files(&p.b)["doc.txt"], b"v2 from b, unscanned");
    drop((sb, peer_a));
    // The next sync scans it and the rules make it a conflict: both kept.
    let report = p.converge();
    assert_eq!(report.conflicts.len(), 1);
    let contents: Vec<Vec<u8>> = files(&p.a).into_values().collect();
    assert!(contents.contains(&b"v2 from a".to_vec()));
    assert!(contents.contains(&b"v2 from b, unscanned".to_vec()));
}

/// Counts the files B holds when A's scan commits its second batch, waiting
/// (at most `WAIT`) for B to hold some: those of A's first batch.
struct FilesOfBDuringScan {
    b: PathBuf,
    batches: AtomicUsize,
    held: AtomicUsize,
}

impl FilesOfBDuringScan {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// B's files, counted without failing on the temp files coming and going.
    fn count(&self) -> usize {
        let subdirs = fs::read_dir(&self.b).into_iter().flatten().flatten();
        subdirs
            .flat_map(|dir| fs::read_dir(dir.path()).into_iter().flatten().flatten())
            .filter(|file| file.file_name().to_string_lossy().starts_with('f'))
            .count()
    }
}

impl scan::ScanObserver for FilesOfBDuringScan {
    fn batch_committed(&self, _entries: usize, _last_seq: u64) {
        // B's scan commits nothing: these are A's batches.
        if self.batches.fetch_add(1, Ordering::SeqCst) != 1 {
            return;
        }
        let started = std::time::Instant::now();
        let mut held = self.count();
        while held == 0 && started.elapsed() < Self::WAIT {
            std::thread::sleep(std::time::Duration::from_millis(5));
            held = self.count();
        }
        self.held.store(held, Ordering::SeqCst);
    }
}

#[test]
fn a_first_sync_into_an_empty_folder_writes_files_while_the_other_is_still_scanned() {
    let p = Pair::new();
    write_files(&p.a, 600, 4, 3000);
    let watch = std::sync::Arc::new(FilesOfBDuringScan {
        b: p.b.clone(),
        batches: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
    });
    let options = SyncOptions {
        scan: scan::ScanOptions {
            batch_size: 100,
            observer: Some(watch.clone()),
            ..Default::default()
        },
        ..SyncOptions::default()
    };
    let report = p.sync_with(&options).unwrap();
    assert!(report.identical, "{:?}", report.differences);
    assert_eq!(files(&p.b), files(&p.a));
    // Each file was written once, not planned again once the scan was done.
    assert_eq!(report.b.applied, 600 + 4);
    // A's scan is stopped in its second batch until B holds some of its files:
    // those of its first batch (100 entries, the directories among them).
    assert!(watch.batches.load(Ordering::SeqCst) > 2);
    let held = watch.held.load(Ordering::SeqCst);
    assert!(
        (1..100).contains(&held),
        "B held {held} files while A was scanned"
    );
}

/// Takes B's history database away (an exclusive lock held until the sync ends)
/// when A's scan commits its first batch, and counts the bytes A's scan reads.
struct LockBDuringScan {
    b_history: PathBuf,
    lock: std::sync::Mutex<Option<rusqlite::Connection>>,
    bytes_read: std::sync::atomic::AtomicU64,
}

impl scan::ScanObserver for LockBDuringScan {
    fn bytes_read(&self, _path: &str, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Ordering::SeqCst);
    }

    fn batch_committed(&self, _entries: usize, _last_seq: u64) {
        let mut lock = self.lock.lock().unwrap();
        if lock.is_none() {
            let conn = rusqlite::Connection::open(&self.b_history).unwrap();
            conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
            *lock = Some(conn);
        }
    }
}

#[test]
fn a_first_sync_whose_copy_fails_stops_scanning_the_other_side_at_once() {
    let p = Pair::new();
    let total = write_files(&p.a, 600, 4, 3000);
    let watch = std::sync::Arc::new(LockBDuringScan {
        b_history: p.b.join(".latus/history.db"),
        lock: std::sync::Mutex::new(None),
        bytes_read: Default::default(),
    });
    let options = SyncOptions {
        scan: scan::ScanOptions {
            batch_size: 20,
            // A whole scan of A would take 18 s.
            max_read_bytes_per_sec: 100_000.0,
            observer: Some(watch.clone()),
            ..Default::default()
        },
        ..SyncOptions::default()
    };
    let err = p.sync_with(&options).unwrap_err();
    assert!(matches!(err, Error::DatabaseLocked(_)), "{err}");
    // B's history stays locked for 3 s before its writer gives up: A's scan
    // read about 300 kB meanwhile, not the whole of A.
    let read = watch.bytes_read.load(Ordering::SeqCst);
    assert!(read < total / 2, "A's scan read {read} of {total} bytes");
}

#[test]
fn an_interrupted_apply_converges_on_the_next_run() {
    let p = Pair::new();
    write_files(&p.a, 50, 5, 5000);
    let options = SyncOptions {
        merge: MergeOptions {
            batch_size: 7,
            interrupt_after: Some(23),
            ..MergeOptions::default()
        },
        ..SyncOptions::default()
    };
    let report = p.sync_with(&options).unwrap();
    assert!(report.interrupted);
    // No partial file at any final path: every file on B is one of A's.
    let on_a = files(&p.a);
    for (path, content) in files(&p.b) {
        assert_eq!(on_a.get(&path), Some(&content), "{path}");
    }
    p.converge();
}

#[test]
fn a_mass_deletion_stops_and_changes_nothing_unless_allowed() {
    let p = Pair::new();
    for i in 0..20 {
        write(&p.a, &format!("f{i}"), b"data");
    }
    p.converge();
    for i in 0..15 {
        fs::remove_file(p.a.join(format!("f{i}"))).unwrap();
    }
    let before = tree(&p.b);
    let err = p.sync_with(&SyncOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MassDelete {
                deletes: 15,
                files: 20,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--allow-mass-delete"));
    assert_eq!(tree(&p.b), before);
    let allowed = SyncOptions {
        allow_mass_delete: true,
        ..SyncOptions::default()
    };
    assert!(p.sync_with(&allowed).unwrap().identical);
    assert_eq!(files(&p.b).len(), 5);
    assert_eq!(trashed(&p.b).len(), 15);
}

#[test]
fn a_root_that_lost_its_marker_is_refused_not_read_as_deleted() {
    let p = Pair::new();
    write(&p.a, "precious.txt", b"keep me");
    p.converge();
    // The drive is unmounted: its mount point is an empty directory.
    fs::remove_dir_all(&p.b).unwrap();
    fs::create_dir(&p.b).unwrap();
    let err = p.sync_with(&SyncOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingMarker(_)), "{err}");
    assert_eq!(files(&p.a)["precious.txt"], b"keep me");
    assert!(
        fs::read_dir(&p.b).unwrap().next().is_none(),
        "nothing written to B"
    );
}

#[test]
fn nothing_is_written_through_a_symlinked_directory() {
    let p = Pair::new();
    let outside = p._dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    write(&p.a, "d/f.txt", b"must stay inside");
    symlink(&outside, p.b.join("d")).unwrap();
    let report = p.converge();
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote outside the root"
    );
    // The directory keeps the name; B's symlink is kept as a conflict copy.
    assert_eq!(tree(&p.b)["d"].0, Kind::Dir);
    assert_eq!(report.conflicts.len(), 1);
}

#[test]
fn paths_from_a_peer_that_escape_the_root_are_refused() {
    let p = Pair::new();
    write(&p.a, "ok.txt", b"fine");
    p.converge();
    let fb = Folder::open(&p.b).unwrap();
    let mut sb = HistoryStore::open(&fb.history_path()).unwrap();
    let fa = Folder::open(&p.a).unwrap();
    let peer = FolderPeer::open(&fa).unwrap();
    let mut evil = common::current(&HistoryStore::open(&fa.history_path()).unwrap())
        .remove("ok.txt")
        .unwrap();
    for (seq, path) in [
        (1000, "../escaped.txt"),
        (1001, "/etc/evil"),
        (1002, ".latus/history.db"),
    ] {
        evil.seq = seq;
        evil.path = path.to_string();
        sb.store_remote(&peer.id(), std::slice::from_ref(&evil), seq, None)
            .unwrap();
    }
    let plan = diff::plan(&sb, &peer.id()).unwrap();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.warnings.len(), 3, "{:?}", plan.warnings);
    assert!(!p._dir.path().join("escaped.txt").exists());
}

#[test]
fn a_folder_peer_reads_a_chunk_where_it_is_whatever_the_path_hint_says() {
    let p = Pair::new();
    let content = bytes(10_000, 21);
    write(&p.a, "x.bin", &content);
    p.converge();
    let fa = Folder::open(&p.a).unwrap();
    let peer = FolderPeer::open(&fa).unwrap();
    let hash = latus::content::Hash::of(&content);
    let chunk = latus::content::ChunkInfo {
        hash,
        offset: 0,
        len: content.len() as u32,
    };
    for hint in ["x.bin", "gone.bin", "../outside.bin", "sub"] {
        assert_eq!(
            peer.read_chunk(hint, &hash, &chunk).unwrap().as_deref(),
            Some(&content[..]),
            "hint {hint}"
        );
    }
    // Other bytes of the same size at the hinted path (and no other holder): not
    // the chunk, whatever the path says.
    let mut other = content.clone();
    other[0] ^= 1;
    fs::write(p.a.join("x.bin"), &other).unwrap();
    assert_eq!(peer.read_chunk("x.bin", &hash, &chunk).unwrap(), None);
}

#[test]
fn a_replaced_version_can_be_restored_from_the_trash() {
    let p = Pair::new();
    write(&p.a, "notes.txt", b"old notes");
    p.converge();
    write(&p.a, "notes.txt", b"new notes");
    p.converge();
    let fb = Folder::open(&p.b).unwrap();
    let items = latus::trash::list(&fb).unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].path, "notes.txt");
    latus::trash::restore(&fb, "notes.txt", None).unwrap();
    assert_eq!(files(&p.b)["notes.txt"], b"old notes");
    // The restored version is a new change and reaches A; nothing is lost.
    p.converge();
    assert_eq!(files(&p.a)["notes.txt"], b"old notes");
    assert!(
        trashed(&p.a).contains(&b"new notes".to_vec())
            || trashed(&p.b).contains(&b"new notes".to_vec())
    );
}

#[test]
fn old_trash_is_purged_by_policy() {
    let p = Pair::new();
    write(&p.a, "x", b"1");
    p.converge();
    write(&p.a, "x", b"2");
    p.converge();
    let trash_dir = p.b.join(".latus/trash");
    let batch = fs::read_dir(&trash_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // A batch named as if trashed 31 days ago.
    fs::rename(&batch, trash_dir.join(common::trash_batch_of_days_ago(31))).unwrap();
    p.converge();
    assert!(fs::read_dir(&trash_dir).unwrap().next().is_none());
}
