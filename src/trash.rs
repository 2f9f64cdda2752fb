//! The trash: every version a sync replaces or deletes is moved (not copied) to
//! `.latus/trash/<time>/<original path>`, where it stays until the trash policy
//! removes it (default: 30 days). `latus trash list|restore` reads it back.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::folder::{Folder, check_relative};
use crate::now_ns;

const TRASH_DIR: &str = "trash";
const NS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// One trashed version.
#[derive(Debug, Clone, Serialize)]
pub struct TrashedItem {
    /// Where it was in the folder.
    pub path: String,
    /// When it was trashed (Unix ns); also the name of its trash batch.
    pub trashed_at_ns: i64,
    pub size: u64,
    pub kind: &'static str,
}

/// The trash of one folder; each sync run trashes into a batch of its own.
pub struct Trash {
    dir: PathBuf,
    batch: Option<PathBuf>,
}

impl Trash {
    pub fn new(folder: &Folder) -> Self {
        Trash {
            dir: trash_dir(folder),
            batch: None,
        }
    }

    /// Moves `root/rel` into the trash.
    pub fn take(&mut self, root: &Path, rel: &str) -> Result<()> {
        let from = root.join(rel);
        let to = self.slot(rel)?;
        fs::rename(&from, &to).map_err(|e| Error::io(&from, e))
    }

    /// Keeps `root/rel` in the trash by a hard link, so that renaming a new version
    /// over it replaces the path atomically and still loses nothing.
    pub fn keep(&mut self, root: &Path, rel: &str) -> Result<()> {
        let from = root.join(rel);
        let to = self.slot(rel)?;
        // hard_link does not follow a symlink: the link itself is kept.
        fs::hard_link(&from, &to).map_err(|e| Error::io(&from, e))
    }

    /// A free place for `rel` in the current batch (a new batch if `rel` was
    /// already trashed in this one).
    fn slot(&mut self, rel: &str) -> Result<PathBuf> {
        for _ in 0..3 {
            let batch = match &self.batch {
                Some(batch) => batch.clone(),
                None => {
                    let batch = self.dir.join(now_ns().to_string());
                    fs::create_dir_all(&batch).map_err(|e| Error::io(&batch, e))?;
                    self.batch = Some(batch.clone());
                    batch
                }
            };
            let slot = batch.join(rel);
            if fs::symlink_metadata(&slot).is_err() {
                if let Some(parent) = slot.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                return Ok(slot);
            }
            self.batch = None;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(Error::io(
            self.dir.join(rel),
            std::io::Error::new(ErrorKind::AlreadyExists, "no free trash slot"),
        ))
    }
}

fn trash_dir(folder: &Folder) -> PathBuf {
    folder.marker_dir().join(TRASH_DIR)
}

/// The trash batches, oldest first: (time, directory).
fn batches(folder: &Folder) -> Result<Vec<(i64, PathBuf)>> {
    let dir = trash_dir(folder);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        if let Some(time) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            found.push((time, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Every trashed version, newest first.
pub fn list(folder: &Folder) -> Result<Vec<TrashedItem>> {
    let mut items = Vec::new();
    for (time, batch) in batches(folder)?.into_iter().rev() {
        collect(&batch, &batch, time, &mut items)?;
    }
    Ok(items)
}

fn collect(batch: &Path, dir: &Path, time: i64, items: &mut Vec<TrashedItem>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            collect(batch, &path, time, items)?;
            continue;
        }
        let Some(rel) = path.strip_prefix(batch).ok().and_then(Path::to_str) else {
            continue;
        };
        items.push(TrashedItem {
            path: rel.to_string(),
            trashed_at_ns: time,
            size: meta.size(),
            kind: if meta.is_symlink() { "symlink" } else { "file" },
        });
    }
    Ok(())
}

/// Puts the newest trashed version of `rel` (or the one trashed at `at_ns`) back
/// at its path. Whatever is at the path now goes to the trash first.
pub fn restore(folder: &Folder, rel: &str, at_ns: Option<i64>) -> Result<TrashedItem> {
    check_relative(rel)?;
    let item = list(folder)?
        .into_iter()
        .find(|item| item.path == rel && at_ns.is_none_or(|t| t == item.trashed_at_ns))
        .ok_or_else(|| Error::NotInTrash {
            root: folder.root().to_path_buf(),
            path: rel.to_string(),
        })?;
    let from = trash_dir(folder)
        .join(item.trashed_at_ns.to_string())
        .join(rel);
    let to = folder.root().join(rel);
    crate::merge::prepare_parent(folder.root(), rel)?;
    match fs::symlink_metadata(&to) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::io(
                &to,
                std::io::Error::new(ErrorKind::AlreadyExists, "a directory is in the way"),
            ));
        }
        Ok(_) => Trash::new(folder).take(folder.root(), rel)?,
        Err(_) => {}
    }
    fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
    Ok(item)
}

/// Removes the trash batches older than `keep_days`, and logs how many.
pub fn purge(folder: &Folder, keep_days: u32) -> Result<()> {
    let cutoff = now_ns() - i64::from(keep_days) * NS_PER_DAY;
    let mut removed = 0;
    for (time, batch) in batches(folder)? {
        if time < cutoff {
            fs::remove_dir_all(&batch).map_err(|e| Error::io(&batch, e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            "{}: removed {removed} trash batches older than {keep_days} days",
            folder.root().display()
        );
    }
    Ok(())
}
