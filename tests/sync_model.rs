//! Randomised model test of the reconciliation engine, in the style of Dropbox's
//! CanopyCheck: two or three replicas (real folders), random edits on each, random
//! syncs between random pairs, some interrupted half-way. Checked:
//! - no sync loses a version: every file content present on either side before a
//!   sync is, after it, a current file, a conflict copy, or in a trash;
//! - termination and convergence: after final rounds all replicas are identical
//!   (paths, kinds, bytes, mtimes, modes, link targets).
//!
//! Seeded: `LATUS_MODEL_SEED` (default 1) and `LATUS_MODEL_CASES` (default 10,000).
//! A failure prints the seed of its case; rerun it alone with
//! `LATUS_MODEL_SEED=<seed> LATUS_MODEL_CASES=1 cargo test --test sync_model`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{trashed, tree};
use latus::history::Kind;
use latus::merge::MergeOptions;
use latus::sync::{SyncOptions, sync};

/// splitmix64: a tiny deterministic generator, enough for choosing operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A small universe of names, so that edits on different replicas collide.
const PATHS: &[&str] = &["a", "b", "d/a", "d/b", "d/e/a", "e/a", "e"];

struct Case {
    rng: Rng,
    replicas: Vec<PathBuf>,
    /// Counter making every written content unique, so a lost one is noticed.
    written: u64,
    log: Vec<String>,
}

impl Case {
    fn content(&mut self) -> Vec<u8> {
        self.written += 1;
        let len = self.rng.below(3) * 40;
        let mut bytes = format!("version {} ", self.written).into_bytes();
        bytes.resize(bytes.len() + len, b'.');
        bytes
    }

    /// One random local change on `replica`: create/edit, delete, rename, mkdir,
    /// rmdir, symlink, or a type change.
    fn mutate(&mut self, replica: usize) {
        let root = self.replicas[replica].clone();
        let path = *self.rng.pick(PATHS);
        let abs = root.join(path);
        let op = self.rng.below(8);
        let done = match op {
            0 | 1 => {
                let content = self.content();
                remove_if_not_file(&abs);
                fs::create_dir_all(abs.parent().unwrap_or(&root)).is_ok()
                    && fs::write(&abs, content).is_ok()
            }
            2 => fs::remove_file(&abs).is_ok(),
            3 => {
                let to = root.join(self.rng.pick(PATHS));
                !to.starts_with(&abs)
                    && fs::symlink_metadata(&to).is_err()
                    && fs::create_dir_all(to.parent().unwrap_or(&root)).is_ok()
                    && fs::rename(&abs, &to).is_ok()
            }
            4 => fs::create_dir_all(&abs).is_ok(),
            5 => fs::remove_dir_all(&abs).is_ok(),
            6 => {
                let target = format!("t{}", self.written);
                self.written += 1;
                remove_if_not_file(&abs);
                let _ = fs::remove_file(&abs);
                fs::create_dir_all(abs.parent().unwrap_or(&root)).is_ok()
                    && symlink(target, &abs).is_ok()
            }
            _ => {
                // Type change: whatever is there becomes a directory with a file.
                let _ = fs::remove_file(&abs);
                let content = self.content();
                fs::create_dir_all(&abs).is_ok() && fs::write(abs.join("a"), content).is_ok()
            }
        };
        if done {
            self.log.push(format!("r{replica}: op {op} on {path}"));
        }
    }

    fn sync(&mut self, x: usize, y: usize, interrupt_after: Option<usize>) {
        self.log
            .push(format!("sync r{x} r{y} (interrupt {interrupt_after:?})"));
        let before: BTreeSet<Vec<u8>> = [x, y]
            .iter()
            .flat_map(|&r| contents(&self.replicas[r]))
            .collect();
        // Half the syncs build files on two threads ahead of placing them.
        let build_threads = 2 * self.rng.below(2);
        // Half of them assemble in .latus/partial/, as the daemon does.
        let resumable = self.rng.below(2) == 1;
        self.log.push(format!(
            "  build threads: {build_threads}, resumable: {resumable}"
        ));
        let options = SyncOptions {
            allow_mass_delete: true,
            scan: latus::scan::ScanOptions {
                hash_threads: 1,
                ..Default::default()
            },
            merge: MergeOptions {
                batch_size: 1 + self.rng.below(4),
                build_threads,
                interrupt_after,
                resumable,
                ..MergeOptions::default()
            },
            ..SyncOptions::default()
        };
        let report = sync(&self.replicas[x], &self.replicas[y], &options)
            .unwrap_or_else(|e| panic!("sync failed: {e}"));
        let after: BTreeSet<Vec<u8>> = self
            .replicas
            .iter()
            .flat_map(|r| contents(r).into_iter().chain(trashed(r)))
            .collect();
        let lost: Vec<_> = before
            .difference(&after)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert!(lost.is_empty(), "versions lost: {lost:?}");
        if interrupt_after.is_none() {
            assert!(
                report.identical,
                "r{x} and r{y} differ after a sync: {:?} (warnings: {:?}, actions: {:?})",
                report.differences,
                report.warnings,
                report
                    .actions
                    .iter()
                    .map(|a| format!("{}: {}", a.root.display(), a.line))
                    .collect::<Vec<_>>()
            );
        }
    }
}

fn remove_if_not_file(abs: &Path) {
    if let Ok(meta) = fs::symlink_metadata(abs)
        && meta.is_dir()
    {
        let _ = fs::remove_dir_all(abs);
    }
}

/// Every file content under `root`, `.latus/` excepted.
fn contents(root: &Path) -> Vec<Vec<u8>> {
    tree(root)
        .into_values()
        .filter(|v| v.0 == Kind::File)
        .map(|v| v.1)
        .collect()
}

fn run_case(seed: u64, scratch: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir_in(scratch).map_err(|e| e.to_string())?;
    let mut rng = Rng(seed);
    let count = 2 + rng.below(2);
    let replicas: Vec<PathBuf> = (0..count)
        .map(|i| dir.path().join(format!("r{i}")))
        .collect();
    for r in &replicas {
        fs::create_dir(r).map_err(|e| e.to_string())?;
    }
    let mut case = Case {
        rng,
        replicas,
        written: 0,
        log: Vec::new(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..1 + case.rng.below(4) {
            for _ in 0..case.rng.below(4) {
                let r = case.rng.below(count);
                case.mutate(r);
            }
            let x = case.rng.below(count);
            let y = (x + 1 + case.rng.below(count - 1)) % count;
            let interrupt = (case.rng.below(4) == 0).then(|| case.rng.below(4));
            case.sync(x, y, interrupt);
        }
        // Final rounds: every pair, until nothing changes (bounded).
        for _ in 0..count {
            for x in 0..count {
                for y in x + 1..count {
                    case.sync(x, y, None);
                }
            }
        }
        let first = tree(&case.replicas[0]);
        for (i, r) in case.replicas.iter().enumerate().skip(1) {
            assert_eq!(first, tree(r), "r0 and r{i} did not converge");
        }
    }));
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{message}\nsteps:\n  {}", case.log.join("\n  "))
    })
}

#[test]
fn random_edits_and_syncs_converge_without_losing_a_version() {
    let base: u64 = std::env::var("LATUS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let cases: u64 = std::env::var("LATUS_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    // tmpfs when there is one: the cases create thousands of small databases.
    let scratch = ["/dev/shm", "/tmp"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir() && tempfile::tempdir_in(p).is_ok())
        .unwrap_or_else(std::env::temp_dir);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let scratch = &scratch;
                s.spawn(move || {
                    (0..cases)
                        .filter(|i| i % threads == t)
                        .map(|i| base + i)
                        .find_map(|seed| {
                            run_case(seed, scratch)
                                .err()
                                .map(|e| format!("case seed {seed} failed: {e}"))
                        })
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().ok().flatten())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
