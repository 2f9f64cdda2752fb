//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses a different subset

pub mod daemon;
pub mod prosody;
pub mod xmpp_pair;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use latus::history::{Entry, HistoryStore, Kind};

/// The name of a trash batch made `days` days ago (its time in Unix ns).
pub fn trash_batch_of_days_ago(days: u64) -> String {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400);
    then.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string()
}

/// Writes `content` at `root/rel`, creating parent directories.
pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
}

/// Writes `count` files `d{i % dirs}/f{i}` under `root`, each `size + i` bytes
/// of its own content; returns how many bytes in all.
pub fn write_files(root: &Path, count: usize, dirs: usize, size: usize) -> u64 {
    (0..count)
        .map(|i| {
            let content = bytes(size + i, i as u64);
            write(root, &format!("d{}/f{i}", i % dirs), &content);
            content.len() as u64
        })
        .sum()
}

/// Moves the mtime of every file under `root` a minute back, so a scan trusts
/// their stat next time (files modified within 2 s of a scan are read again).
pub fn backdate(root: &Path) {
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for (rel, (kind, _)) in disk_state(root) {
        if kind == Kind::File {
            let file = fs::File::options()
                .write(true)
                .open(root.join(rel))
                .unwrap();
            file.set_modified(past).unwrap();
        }
    }
}

/// Deterministic incompressible bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The current, non-deleted entries of a history, by path.
pub fn current(store: &HistoryStore) -> BTreeMap<String, Entry> {
    store
        .latest_existing()
        .unwrap()
        .into_iter()
        .map(|e| (e.path.clone(), e))
        .collect()
}

/// The hash the history records for a file holding `bytes`.
pub fn content_hash(bytes: &[u8]) -> latus::content::Hash {
    latus::content::ContentHasher::default()
        .hash_reader(&mut &bytes[..], |_| {})
        .unwrap()
        .hash
}

/// Every file, dir and symlink under `root` (except `.latus`), as the history
/// should record them: path → (kind, hash of content or link target).
pub fn disk_state(root: &Path) -> BTreeMap<String, (Kind, Option<latus::content::Hash>)> {
    tree(root)
        .into_iter()
        .map(|(path, (kind, bytes, _, _))| {
            let hash = match kind {
                Kind::File => Some(content_hash(&bytes)),
                Kind::Symlink => Some(latus::content::Hash::of(&bytes)),
                _ => None,
            };
            (path, (kind, hash))
        })
        .collect()
}

/// What the history says is current, in the shape of [`disk_state`].
pub fn recorded_state(
    store: &HistoryStore,
) -> BTreeMap<String, (Kind, Option<latus::content::Hash>)> {
    current(store)
        .into_iter()
        .map(|(path, e)| (path, (e.kind, e.hash)))
        .collect()
}

/// What a sync must make equal: path → (kind, content or link target, mtime of
/// files and symlinks, mode of files and dirs). `.latus` is left out.
pub type Tree = BTreeMap<String, (Kind, Vec<u8>, i64, u32)>;

pub fn tree(root: &Path) -> Tree {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for item in fs::read_dir(&dir).unwrap() {
            let path = item.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if rel == ".latus" {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            let mode = meta.mode() & 0o7777;
            let value = if meta.is_dir() {
                stack.push(path);
                (Kind::Dir, Vec::new(), 0, mode)
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                (
                    Kind::Symlink,
                    target.to_str().unwrap().as_bytes().to_vec(),
                    mtime,
                    0,
                )
            } else {
                (Kind::File, fs::read(&path).unwrap(), mtime, mode)
            };
            out.insert(rel, value);
        }
    }
    out
}

/// The files of a tree: path → content.
pub fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(root)
        .into_iter()
        .filter(|(_, v)| v.0 == Kind::File)
        .map(|(p, v)| (p, v.1))
        .collect()
}

/// Every file content kept in a folder's trash.
pub fn trashed(root: &Path) -> Vec<Vec<u8>> {
    let dir = root.join(".latus/trash");
    if !dir.exists() {
        return Vec::new();
    }
    files(&dir).into_values().collect()
}

/// Names in a directory exactly as spelled on disk, sorted (`.latus` left out).
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".latus")
        .collect();
    names.sort();
    names
}
