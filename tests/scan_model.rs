//! Randomised test of the scanner: random edits of a small tree, scans at random
//! moments; after every scan the history's current state is exactly the disk's, and
//! a second scan finds nothing new.
//!
//! The edits come faster than a coarse timestamp tick: on file systems and kernels
//! without fine-grained timestamps this also checks that a file rewritten with the
//! same size within one tick is not missed (Linux 6.13+ ext4 stamps such writes
//! finely once the file was stat'ed, so there the race cannot arise).

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::{bytes, disk_state, recorded_state};
use latus::device::PeerId;
use latus::folder::Folder;
use latus::history::HistoryStore;
use latus::scan::{ScanOptions, scan};
use proptest::prelude::*;

const PATHS: &[&str] = &["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "x", "x/a"];
const MODES: &[u32] = &[0o644, 0o600, 0o755];

#[derive(Debug, Clone)]
enum Op {
    Write { path: usize, len: usize, seed: u64 },
    Remove { path: usize },
    Rename { from: usize, to: usize },
    Mkdir { path: usize },
    Symlink { path: usize, target: usize },
    Chmod { path: usize, mode: usize },
    Scan,
}

fn op() -> impl Strategy<Value = Op> {
    let path = 0..PATHS.len();
    // Mostly tiny files (the same size again and again), sometimes multi-chunk ones.
    let len = prop_oneof![4 => 0usize..4, 1 => 40_000usize..400_000];
    prop_oneof![
        4 => (path.clone(), len, any::<u64>()).prop_map(|(path, len, seed)| Op::Write { path, len, seed }),
        2 => path.clone().prop_map(|path| Op::Remove { path }),
        2 => (path.clone(), path.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => path.clone().prop_map(|path| Op::Mkdir { path }),
        1 => (path.clone(), path.clone()).prop_map(|(path, target)| Op::Symlink { path, target }),
        1 => (path, 0..MODES.len()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        2 => Just(Op::Scan),
    ]
}

/// Applies an edit as a user would; edits that make no sense in the current tree
/// (writing under a file, renaming what is not there) simply fail and are skipped.
fn apply(root: &Path, op: &Op) {
    let at = |i: usize| root.join(PATHS[i]);
    let _ = match *op {
        Op::Write { path, len, seed } => {
            let path = at(path);
            path.parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| {
                    if path.is_dir() {
                        Ok(())
                    } else {
                        fs::write(&path, bytes(len, seed))
                    }
                })
        }
        Op::Remove { path } => {
            let path = at(path);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) => Err(e),
            }
        }
        Op::Rename { from, to } => fs::rename(at(from), at(to)),
        Op::Mkdir { path } => fs::create_dir_all(at(path)),
        Op::Symlink { path, target } => symlink(PATHS[target], at(path)),
        Op::Chmod { path, mode } => {
            let path = at(path);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(MODES[mode]))
                }
                _ => Ok(()),
            }
        }
        Op::Scan => Ok(()),
    };
}

fn check_scan(folder: &Folder, store: &mut HistoryStore) -> Result<(), TestCaseError> {
    let device = PeerId([3; 32]);
    let options = ScanOptions::default();
    let first = scan(folder, store, device, &options).unwrap();
    prop_assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    prop_assert_eq!(recorded_state(store), disk_state(folder.root()));
    let second = scan(folder, store, device, &options).unwrap();
    prop_assert_eq!((second.new, second.changed, second.deleted), (0, 0, 0));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn the_history_always_matches_the_disk(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open_or_create(dir.path()).unwrap();
        let mut store = HistoryStore::open(&folder.history_path()).unwrap();
        for op in &ops {
            match op {
                Op::Scan => check_scan(&folder, &mut store)?,
                edit => apply(folder.root(), edit),
            }
        }
        check_scan(&folder, &mut store)?;
    }
}
