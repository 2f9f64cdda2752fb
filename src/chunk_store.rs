//! The state of the chunks that resumable builds fetch (the daemon's), in
//! SQLite (`.latus/chunks.db`), beside the partial files they are written
//! into (`.latus/partial/`). For each content being assembled, a chunk is
//! not started (no row), asked for (with the token of the build that asked), or
//! complete (written into the partial file). A daemon killed with kill -9 thus
//! knows on restart which chunks its partial files hold, and asks only for the
//! others; a chunk asked for by a build that is gone counts as not started.
//!
//! It also records which content each path is being built with: a newer
//! version of a path replaces the older work for it, whose partial file then
//! goes at once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::content::Hash;
use crate::error::{Error, Result};
use crate::history::classify;
use crate::merge::remove_if_present;

/// In a folder's `.latus/`.
pub const CHUNK_STORE_DB: &str = "chunks.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS chunks (
    content BLOB NOT NULL,
    idx INTEGER NOT NULL,
    -- 1: asked for, by the build with `token`; 2: complete.
    state INTEGER NOT NULL,
    token INTEGER NOT NULL,
    PRIMARY KEY (content, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS builds (
    path TEXT PRIMARY KEY,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_by_content ON builds (content);
";

const ASKED: i64 = 1;
const COMPLETE: i64 = 2;

pub struct ChunkStore {
    conn: Connection,
    path: PathBuf,
}

/// The token of a build: unique among the builds of this process, and
/// unlikely to repeat one of an earlier process.
pub fn new_token() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let count = NEXT.fetch_add(1, Ordering::Relaxed);
    (i64::from(std::process::id()) << 32) | (count & 0xffff_ffff) as i64
}

impl ChunkStore {
    /// Opens the store in `dir` (a folder's `.latus/`), creating it. A
    /// store that is not a database any more is started afresh: what it held
    /// is only a head start.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(CHUNK_STORE_DB);
        match Self::open_at(&path) {
            Err(Error::CorruptDatabase { reason, .. }) => {
                tracing::warn!(
                    "{} is corrupt ({reason}); starting it afresh",
                    path.display()
                );
                remove_if_present(&path)?;
                remove_if_present(&path.with_extension("db-wal"))?;
                Self::open_at(&path)
            }
            opened => opened,
        }
    }

    fn open_at(path: &Path) -> Result<Self> {
        let err = |e| classify(path, e);
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(3)).map_err(err)?;
        // NORMAL in WAL mode: a crash of the process loses no commit. A power
        // loss may lose the last ones, and the partial file's last writes with
        // them: chunks recorded complete are checked against their hash anyway.
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(ChunkStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        classify(&self.path, e)
    }

    /// Starts the build of `content` at `path` by the build `token`: chunks an
    /// earlier build asked for and never got count as not started again.
    /// Returns the content the path was being built with before, if another
    /// one, and if no other path is being built with it: its work is of no use
    /// any more.
    pub fn start_build(&self, path: &str, content: &Hash, token: i64) -> Result<Option<Hash>> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM chunks WHERE content = ?1 AND state = ?2 AND token != ?3",
            params![&content.0[..], ASKED, token],
        )
        .map_err(|e| self.err(e))?;
        let before: Option<Vec<u8>> = tx
            .query_row(
                "SELECT content FROM builds WHERE path = ?1",
                params![path],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO builds (path, content) VALUES (?1, ?2)",
            params![path, &content.0[..]],
        )
        .map_err(|e| self.err(e))?;
        let replaced = match before.and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
            Some(old) if old != content.0 => {
                let still_built: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM builds WHERE content = ?1)",
                        params![&old[..]],
                        |row| row.get(0),
                    )
                    .map_err(|e| self.err(e))?;
                (!still_built).then_some(Hash(old))
            }
            _ => None,
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(replaced)
    }

    /// The chunks of `content` (by index in its chunk list) recorded complete.
    pub fn complete(&self, content: &Hash) -> Result<HashSet<u32>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT idx FROM chunks WHERE content = ?1 AND state = ?2")
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map(params![&content.0[..], COMPLETE], |row| row.get(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Records, in one transaction, that the chunks `complete` of `content`
    /// (by index) are in its partial file, and that the build `token` asked
    /// for the chunks `asked`.
    pub fn record(
        &self,
        content: &Hash,
        complete: &[u32],
        asked: &[u32],
        token: i64,
    ) -> Result<()> {
        if complete.is_empty() && asked.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut statement = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO chunks (content, idx, state, token) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| self.err(e))?;
            let rows = complete.iter().map(|i| (i, COMPLETE, 0));
            for (index, state, token) in rows.chain(asked.iter().map(|i| (i, ASKED, token))) {
                statement
                    .execute(params![&content.0[..], index, state, token])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets `content`: its build is over (placed, or its partial file gone).
    pub fn forget(&self, content: &Hash) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        for table in ["chunks", "builds"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE content = ?1"),
                params![&content.0[..]],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets every content not in `kept`.
    pub fn keep_only(&self, kept: &HashSet<Hash>) -> Result<()> {
        let mut known: HashSet<Vec<u8>> = HashSet::new();
        for table in ["chunks", "builds"] {
            let mut statement = self
                .conn
                .prepare(&format!("SELECT DISTINCT content FROM {table}"))
                .map_err(|e| self.err(e))?;
            let rows = statement
                .query_map([], |row| row.get(0))
                .map_err(|e| self.err(e))?;
            for row in rows {
                known.insert(row.map_err(|e| self.err(e))?);
            }
        }
        for content in known {
            let Ok(hash) = <[u8; 32]>::try_from(content) else {
                continue;
            };
            if !kept.contains(&Hash(hash)) {
                self.forget(&Hash(hash))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_go_from_asked_to_complete_and_a_gone_build_asked_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let content = Hash([7; 32]);
        let first = new_token();
        assert_eq!(store.start_build("a.bin", &content, first).unwrap(), None);
        store.record(&content, &[], &[0, 1, 2, 3], first).unwrap();
        store.record(&content, &[0, 1], &[], first).unwrap();
        assert_eq!(store.complete(&content).unwrap(), HashSet::from([0, 1]));

        // Killed, and opened again by a new build: chunks 2 and 3 were asked
        // for by a build that is gone; 0 and 1 stay complete.
        drop(store);
        let store = ChunkStore::open(dir.path()).unwrap();
        let second = new_token();
        assert_ne!(first, second);
        assert_eq!(store.start_build("a.bin", &content, second).unwrap(), None);
        let asked: i64 = store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM chunks WHERE state = ?1",
                [ASKED],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(asked, 0);
        store.record(&content, &[2, 3], &[], second).unwrap();
        assert_eq!(
            store.complete(&content).unwrap(),
            HashSet::from([0, 1, 2, 3])
        );

        store.forget(&content).unwrap();
        assert!(store.complete(&content).unwrap().is_empty());
    }

    #[test]
    fn a_newer_version_of_a_path_replaces_the_older_work_unless_another_path_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let (old, new) = (Hash([1; 32]), Hash([2; 32]));
        store.start_build("a.bin", &old, 1).unwrap();
        store.start_build("copy.bin", &old, 1).unwrap();
        // copy.bin is still built with the old content.
        assert_eq!(store.start_build("a.bin", &new, 2).unwrap(), None);
        assert_eq!(store.start_build("copy.bin", &new, 2).unwrap(), Some(old));
        // The same content again replaces nothing.
        assert_eq!(store.start_build("a.bin", &new, 3).unwrap(), None);

        store.record(&old, &[0], &[], 1).unwrap();
        store.record(&new, &[0], &[], 3).unwrap();
        store.keep_only(&HashSet::from([new])).unwrap();
        assert!(store.complete(&old).unwrap().is_empty());
        assert_eq!(store.complete(&new).unwrap(), HashSet::from([0]));
    }

    #[test]
    fn a_store_that_is_not_a_database_is_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHUNK_STORE_DB), vec![0x55; 8192]).unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        assert!(store.complete(&Hash([1; 32])).unwrap().is_empty());
    }
}
