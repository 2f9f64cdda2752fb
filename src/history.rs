//! The history store (the seed's `FileHistoryStore`): an append-only log of every
//! version of every path of one folder, in SQLite (WAL, one writer).
//!
//! Each entry gets the next per-folder sequence number, so a peer can ask for
//! "everything after seq N" and never needs the whole index again.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, params};
use serde::Serialize;

use crate::content::{ChunkInfo, Hash, chunk_list_hash};
use crate::device::PeerId;
use crate::error::{Error, Result};

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Never edit a released step: append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE entries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        hash BLOB,
        link_target TEXT,
        peerid BLOB NOT NULL,
        author_peerid BLOB NOT NULL,
        author_utime_ns INTEGER NOT NULL,
        utime_ns INTEGER NOT NULL
    );
    CREATE INDEX entries_by_path ON entries(path, seq);
    CREATE INDEX entries_by_hash ON entries(hash) WHERE hash IS NOT NULL;
    -- One row per distinct chunk.
    CREATE TABLE chunks (
        hash BLOB PRIMARY KEY,
        size INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- The chunk list of each distinct file content (by content hash).
    CREATE TABLE content_chunks (
        content BLOB NOT NULL,
        idx INTEGER NOT NULL,
        chunk BLOB NOT NULL,
        offset INTEGER NOT NULL,
        PRIMARY KEY (content, idx)
    ) WITHOUT ROWID;
    CREATE INDEX content_chunks_by_chunk ON content_chunks(chunk);
"#,
    r#"
    -- Facts about this replica of the folder (its replica id).
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    -- The histories of the peers this folder syncs with, as far as received:
    -- what diff_histories compares ours with. Local fields (inode, ctime) are not sent.
    CREATE TABLE remote_entries (
        peer BLOB NOT NULL,
        seq INTEGER NOT NULL,
        path TEXT NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        hash BLOB,
        link_target TEXT,
        peerid BLOB NOT NULL,
        author_peerid BLOB NOT NULL,
        author_utime_ns INTEGER NOT NULL,
        utime_ns INTEGER NOT NULL,
        PRIMARY KEY (peer, seq)
    ) WITHOUT ROWID;
    CREATE INDEX remote_entries_by_path ON remote_entries(peer, path, seq);
    -- How far each peer's history has been received, and where its root was last
    -- seen (a local peer), to tell an unmounted drive from a new folder.
    CREATE TABLE remote_peers (
        peer BLOB PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        root TEXT
    ) WITHOUT ROWID;
"#,
    r#"
    -- Device mode: what Latus last wrote to (or found in sync on) each dumb device,
    -- by case-folded path. The device is never hashed: a file there is unchanged
    -- while its size and mtime are still the ones recorded here.
    CREATE TABLE device_files (
        device BLOB NOT NULL,
        key TEXT NOT NULL,
        path TEXT NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash BLOB,
        PRIMARY KEY (device, key)
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        device BLOB PRIMARY KEY,
        root TEXT NOT NULL
    ) WITHOUT ROWID;
"#,
    r#"
    -- Where both sides were last found identical: this history's seq and the
    -- peer's. Only paths with entries after these need planning again.
    ALTER TABLE remote_peers ADD COLUMN identical_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE remote_peers ADD COLUMN identical_remote_seq INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
    -- A content of several chunks is now hashed from its chunk list: this step's
    -- transaction also rewrites the hashes of the lists stored here (see
    -- `rehash_chunk_lists`). The peers' histories, whose lists are not all here,
    -- are received again, with the peers' new hashes.
    DELETE FROM remote_entries;
    UPDATE remote_peers SET last_seq = 0, identical_seq = 0, identical_remote_seq = 0;
"#,
];

/// The step of [`MIGRATIONS`] after which [`rehash_chunk_lists`] runs.
const REHASH_STEP: usize = 4;

const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Gives every stored content of several chunks its hash from its chunk list
/// ([`crate::content::content_hash`]), where the file's and the device copies' entries name it.
/// A content of one chunk keeps its hash: it was already its chunk's.
fn rehash_chunk_lists(tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
    // Each content's chunk hashes in order; `None` for a malformed one, which
    // leaves that content as it was rather than give it a wrong hash.
    let mut lists: Vec<(Vec<u8>, Vec<Option<Hash>>)> = Vec::new();
    {
        let mut rows =
            tx.prepare("SELECT content, chunk FROM content_chunks ORDER BY content, idx")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let content: Vec<u8> = row.get(0)?;
            let chunk = Hash::from_slice(&row.get::<_, Vec<u8>>(1)?);
            match lists.last_mut() {
                Some((last, chunks)) if *last == content => chunks.push(chunk),
                _ => lists.push((content, vec![chunk])),
            }
        }
    }
    let rehashed: Vec<(Vec<u8>, Hash)> = lists
        .into_iter()
        .filter(|(_, chunks)| chunks.len() > 1)
        .filter_map(|(old, chunks)| {
            let chunks: Option<Vec<Hash>> = chunks.into_iter().collect();
            Some((old, chunk_list_hash(chunks?)))
        })
        .collect();
    for table in [
        "UPDATE content_chunks SET content = ?2 WHERE content = ?1",
        "UPDATE entries SET hash = ?2 WHERE hash = ?1",
        "UPDATE device_files SET hash = ?2 WHERE hash = ?1",
    ] {
        let mut update = tx.prepare(table)?;
        for (old, new) in &rehashed {
            update.execute(params![old, &new.0[..]])?;
        }
    }
    Ok(())
}

const ENTRY_COLUMNS: &str = "seq, path, kind, size, mtime_ns, mode, inode, ctime_ns, hash, \
     link_target, peerid, author_peerid, author_utime_ns, utime_ns";
/// The same columns from `remote_entries`, which has no local stat fields.
const REMOTE_COLUMNS: &str = "seq, path, kind, size, mtime_ns, mode, 0, 0, hash, \
     link_target, peerid, author_peerid, author_utime_ns, utime_ns";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Deleted,
}

impl Kind {
    pub fn code(self) -> i64 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
            Kind::Deleted => 3,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Deleted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Deleted => "deleted",
        }
    }
}

/// One version of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Assigned by the store when the entry is appended.
    pub seq: u64,
    /// Relative to the folder root, `/`-separated, UTF-8.
    pub path: String,
    pub kind: Kind,
    /// Bytes of content (files) or of the link target (symlinks).
    pub size: u64,
    pub mtime_ns: i64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Local change detection only; not part of the version.
    pub inode: u64,
    pub ctime_ns: i64,
    /// Content hash (files) or hash of the link target (symlinks).
    pub hash: Option<Hash>,
    pub link_target: Option<String>,
    /// The device that recorded this entry.
    pub peerid: PeerId,
    /// The device and time that authored this version.
    pub author_peerid: PeerId,
    pub author_utime_ns: i64,
    /// When this device recorded the entry.
    pub utime_ns: i64,
}

impl Entry {
    /// A version of `path` authored and recorded by `author` at `now_ns`, with no
    /// content or metadata yet (the caller fills in what it observed).
    pub fn authored(path: String, kind: Kind, author: PeerId, now_ns: i64) -> Self {
        Entry {
            seq: 0,
            path,
            kind,
            size: 0,
            mtime_ns: 0,
            mode: 0,
            inode: 0,
            ctime_ns: 0,
            hash: None,
            link_target: None,
            peerid: author,
            author_peerid: author,
            author_utime_ns: now_ns,
            utime_ns: now_ns,
        }
    }
}

/// What Latus knows a dumb device holds at one path (device mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The case-folded path: the device's names are case-insensitive.
    pub key: String,
    /// The path as written on the device.
    pub path: String,
    /// `File` or `Dir`.
    pub kind: Kind,
    pub size: u64,
    /// The mtime the device reported after the write (its own granularity).
    pub mtime_ns: i64,
    /// The content written there (files).
    pub hash: Option<Hash>,
}

/// A write to the history, applied in batches.
// Most records are appends; boxing them to shrink the rare refresh would cost an
// allocation per entry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Record {
    /// A new version; `chunks` is the content's chunk list for files.
    Append {
        entry: Entry,
        chunks: Vec<ChunkInfo>,
    },
    /// The file at `seq` was re-hashed and found identical, but its inode or ctime
    /// moved (a copy-back, a chmod to the same mode): refresh the change-detection
    /// fields so the next scan does not hash it again. Not a new version.
    RefreshStat { seq: u64, inode: u64, ctime_ns: i64 },
}

pub struct HistoryStore {
    conn: Connection,
    path: PathBuf,
}

/// A WAL this long is folded into the database when its store is dropped;
/// shorter ones wait for a later run. A killed process loses nothing of a WAL;
/// a power loss may lose its last commits (`synchronous = NORMAL`), never the
/// database.
const WAL_FOLDED_AT_CLOSE: u64 = 4 << 20;

impl Drop for HistoryStore {
    fn drop(&mut self) {
        if self.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true)
            || std::fs::metadata(wal_path(&self.path))
                .map_or(true, |m| m.len() < WAL_FOLDED_AT_CLOSE)
        {
            return;
        }
        // Without waiting on readers still open: the WAL then stays for later.
        let folded = self
            .conn
            .busy_timeout(Duration::ZERO)
            .and_then(|()| self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"));
        if let Err(e) = folded {
            tracing::debug!("{}: the WAL stays for later: {e}", self.path.display());
        }
    }
}

/// Entries by path, hashed with foldhash (seeded per process): a rescan looks
/// every path of its folder up in one, and SipHash was 5% of its own CPU.
pub type EntriesByPath = HashMap<String, Entry, foldhash::fast::RandomState>;

/// The queries of [`HistoryStore::latest_changed_since`]: the current entries
/// here, then in peer `?1`'s history, of the paths with an entry after `?2` here
/// or after `?3` there.
fn changed_since_queries() -> [String; 2] {
    // UNION ALL, as `IN` ignores duplicates: with UNION, SQLite 3.54 merged the
    // two sides in path order, reading every entry of both indexes (12 ms a
    // query for 20k paths, not 2).
    const CHANGED: &str = "SELECT path FROM entries WHERE seq > ?2 \
         UNION ALL SELECT path FROM remote_entries WHERE peer = ?1 AND seq > ?3";
    [
        format!(
            "SELECT {ENTRY_COLUMNS} FROM entries AS e WHERE path IN ({CHANGED}) \
             AND seq = (SELECT MAX(seq) FROM entries WHERE path = e.path)"
        ),
        format!(
            "SELECT {REMOTE_COLUMNS} FROM remote_entries AS r \
             INDEXED BY remote_entries_by_path WHERE peer = ?1 AND path IN ({CHANGED}) \
             AND seq = (SELECT MAX(seq) FROM remote_entries WHERE peer = ?1 AND path = r.path)"
        ),
    ]
}

/// A read transaction of a [`HistoryStore`], ended when dropped.
pub struct Snapshot<'a> {
    _transaction: Option<rusqlite::Transaction<'a>>,
}

impl HistoryStore {
    /// Opens (creating and migrating if needed) the database for writing.
    pub fn open(path: &Path) -> Result<Self> {
        read_ahead(path);
        let conn = Connection::open(path).map_err(|e| classify(path, e))?;
        let mut store = HistoryStore {
            conn,
            path: path.to_path_buf(),
        };
        store.configure()?;
        store.migrate()?;
        store.ensure_replica_id()?;
        Ok(store)
    }

    /// Opens an existing database for reading; readers never block the writer (WAL).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| classify(path, e))?;
        let store = HistoryStore {
            conn,
            path: path.to_path_buf(),
        };
        store
            .conn
            .busy_timeout(Duration::from_secs(3))
            .map_err(|e| store.err(e))?;
        cache_statements(&store.conn).map_err(|e| store.err(e))?;
        let version = store.schema_version()?;
        if version > SCHEMA_VERSION {
            return Err(store.newer_schema(version));
        }
        Ok(store)
    }

    /// While the returned guard lives, reads see one state of the history and
    /// lock the write-ahead log once, not once per query (and the pages they
    /// read stay cached): for a run of many queries. Within a transaction
    /// already open, nothing more is needed.
    pub fn read_snapshot(&self) -> Result<Snapshot<'_>> {
        match self.conn.is_autocommit() {
            true => Ok(Snapshot {
                _transaction: Some(self.conn.unchecked_transaction().map_err(|e| self.err(e))?),
            }),
            false => Ok(Snapshot { _transaction: None }),
        }
    }

    /// Reads from here on see the history as it is now, and go on seeing it
    /// (whatever is written meanwhile) until the next call: [`Self::read_snapshot`]
    /// for a reader that keeps its snapshot between calls and may be a little behind.
    pub fn renew_snapshot(&self) -> Result<()> {
        let sql = match self.conn.is_autocommit() {
            true => "BEGIN DEFERRED",
            false => "COMMIT; BEGIN DEFERRED",
        };
        self.conn.execute_batch(sql).map_err(|e| self.err(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        classify(&self.path, e)
    }

    fn newer_schema(&self, found: i64) -> Error {
        Error::NewerSchema {
            path: self.path.clone(),
            found,
            known: SCHEMA_VERSION,
        }
    }

    fn configure(&self) -> Result<()> {
        cache_statements(&self.conn).map_err(|e| self.err(e))?;
        // Waiting a little covers a reader checkpointing; longer means another writer.
        self.conn
            .busy_timeout(Duration::from_secs(3))
            .map_err(|e| self.err(e))?;
        // The first real read of the file: a non-database fails here as "corrupt".
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::DatabaseLocked(self.path.clone()));
        }
        // NORMAL in WAL mode: a crash of the process never loses a commit; a power
        // loss may lose the last ones but never corrupts the database.
        // Each checkpoint of the WAL into the database costs two fsyncs, 10 to 45
        // ms each here, in whichever thread commits. A WAL of up to 16 MiB (4,096
        // pages, not SQLite's 1,000) takes a first sync of 20,000 files without
        // one (38 fsyncs, 0.2 s, before). Closing the last connection would
        // checkpoint too, at the end of every `latus sync` or `latus scan`, 0.1 s
        // for two folders: `Drop` does it only once the WAL has grown (see there).
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 4096;")
            .map_err(|e| self.err(e))?;
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map(drop)
            .map_err(|e| self.err(e))
    }

    fn schema_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn migrate(&mut self) -> Result<()> {
        let version = self.schema_version()?;
        if version > SCHEMA_VERSION {
            return Err(self.newer_schema(version));
        }
        for (index, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self
                .conn
                .transaction()
                .map_err(|e| classify(&self.path, e))?;
            tx.execute_batch(step)
                .and_then(|()| match index {
                    REHASH_STEP => rehash_chunk_lists(&tx),
                    _ => Ok(()),
                })
                .and_then(|()| tx.pragma_update(None, "user_version", index as i64 + 1))
                .and_then(|()| tx.commit())
                .map_err(|e| classify(&self.path, e))?;
        }
        Ok(())
    }

    /// Applies `records` in one transaction; returns the sequence numbers given to
    /// the appended entries, in order.
    pub fn write_batch(&mut self, records: &[Record]) -> Result<Vec<u64>> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| classify(&path, e))?;
        let seqs = write_records(&tx, records).map_err(|e| classify(&path, e))?;
        tx.commit().map_err(|e| classify(&path, e))?;
        Ok(seqs)
    }

    fn query_entries(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Entry>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, entry_from_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// The current entry of `path` (which may be a deletion).
    pub fn latest_by_path(&self, path: &str) -> Result<Option<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ?1 ORDER BY seq DESC LIMIT 1"
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut stmt| stmt.query_row([path], entry_from_row).optional())
            .map_err(|e| self.err(e))
    }

    /// The current entry of every path ever recorded, deletions included.
    pub fn latest_all(&self) -> Result<Vec<Entry>> {
        self.latest_of_each_path()
    }

    /// The current entry of every path that exists (its latest entry is not a
    /// deletion), in sequence order.
    pub fn latest_existing(&self) -> Result<Vec<Entry>> {
        let mut latest = self.latest_of_each_path()?;
        latest.retain(|e| e.kind != Kind::Deleted);
        Ok(latest)
    }

    /// [`HistoryStore::latest_existing`] by path: what a rescan compares the
    /// disk with.
    pub fn latest_existing_by_path(&self) -> Result<EntriesByPath> {
        let mut latest = self.latest_of_each_path_by_path()?;
        latest.retain(|_, e| e.kind != Kind::Deleted);
        Ok(latest)
    }

    /// The current (not deleted) entry at each of `paths` and at every path under
    /// them, by path: what a scan of only those paths compares the disk with.
    pub fn latest_existing_under(&self, paths: &[String]) -> Result<EntriesByPath> {
        // "p/" up to "p0" ('0' follows '/'): the paths under p, through the path index.
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries AS e \
             WHERE (path = ?1 OR (path > ?1 || '/' AND path < ?1 || '0')) \
             AND seq = (SELECT MAX(seq) FROM entries WHERE path = e.path)"
        );
        let _snapshot = self.read_snapshot()?;
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let mut latest = EntriesByPath::default();
        for path in paths {
            let rows = stmt
                .query_map([path], entry_from_row)
                .map_err(|e| self.err(e))?;
            for row in rows {
                let entry = row.map_err(|e| self.err(e))?;
                latest.insert(entry.path.clone(), entry);
            }
        }
        latest.retain(|_, e| e.kind != Kind::Deleted);
        Ok(latest)
    }

    /// The latest entry of each path, in sequence order.
    fn latest_of_each_path(&self) -> Result<Vec<Entry>> {
        let mut latest: Vec<Entry> = self.latest_of_each_path_by_path()?.into_values().collect();
        latest.sort_unstable_by_key(|e| e.seq);
        Ok(latest)
    }

    /// The latest entry of each path, by path: one pass over the table in its
    /// own order, keeping the last entry seen of each path. (Asking SQLite for
    /// each path's maximum walks the path index and then looks each row up:
    /// twice the time, and random reads on a cold cache.)
    fn latest_of_each_path_by_path(&self) -> Result<EntriesByPath> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], entry_from_row)
            .map_err(|e| self.err(e))?;
        let mut latest = EntriesByPath::default();
        for row in rows {
            let entry = row.map_err(|e| self.err(e))?;
            latest.insert(entry.path.clone(), entry);
        }
        Ok(latest)
    }

    /// The files whose current content has `hash` (for move/copy detection and
    /// chunk lookup).
    pub fn latests_by_hash(&self, hash: &Hash) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries AS e WHERE hash = ?1 AND kind = 0 \
             AND seq = (SELECT MAX(seq) FROM entries WHERE path = e.path) ORDER BY path"
        );
        self.query_entries(&sql, [&hash.0[..]])
    }

    /// Entries appended after `seq`, oldest first, at most `limit`.
    pub fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>> {
        let sql =
            format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE seq > ?1 ORDER BY seq LIMIT ?2");
        self.query_entries(&sql, params![seq as i64, limit as i64])
    }

    /// Every version of `path`, newest first.
    pub fn history(&self, path: &str) -> Result<Vec<Entry>> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ?1 ORDER BY seq DESC");
        self.query_entries(&sql, [path])
    }

    /// The whole log, newest first, at most `limit` entries.
    pub fn recent(&self, limit: usize) -> Result<Vec<Entry>> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq DESC LIMIT ?1");
        self.query_entries(&sql, [limit as i64])
    }

    /// The highest sequence number given so far (0 for an empty history).
    pub fn last_seq(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM entries", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|s| s as u64)
            .map_err(|e| self.err(e))
    }

    /// The chunk list of a content recorded in this history (empty for an empty
    /// or unknown content). A content of one chunk has no list of its own: its one
    /// chunk is the whole content.
    pub fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        let listed = self.listed_chunks_of(content)?;
        if !listed.is_empty() {
            return Ok(listed);
        }
        let size: Option<i64> = self
            .conn
            .prepare_cached("SELECT size FROM entries WHERE hash = ?1 AND kind = 0 LIMIT 1")
            .and_then(|mut stmt| stmt.query_row([&content.0[..]], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(match size {
            Some(size) if size > 0 => vec![ChunkInfo {
                hash: *content,
                offset: 0,
                len: size as u32,
            }],
            _ => Vec::new(),
        })
    }

    fn listed_chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT cc.chunk, cc.offset, c.size FROM content_chunks AS cc \
                 JOIN chunks AS c ON c.hash = cc.chunk WHERE cc.content = ?1 ORDER BY cc.idx",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([&content.0[..]], |row| {
                Ok(ChunkInfo {
                    hash: hash_column(row, 0)?,
                    offset: row.get::<_, i64>(1)? as u64,
                    len: row.get::<_, i64>(2)? as u32,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// This replica's id: the author id of the versions found here. Each copy of a
    /// folder is a replica of its own, even two folders on one device.
    pub fn replica_id(&self) -> Result<PeerId> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'replica_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        bytes
            .as_deref()
            .and_then(PeerId::from_slice)
            .ok_or_else(|| Error::CorruptDatabase {
                path: self.path.clone(),
                reason: "no replica id".into(),
            })
    }

    fn ensure_replica_id(&mut self) -> Result<()> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).map_err(|e| Error::DeviceState {
            path: self.path.clone(),
            reason: format!("no random bytes for a replica id: {e}"),
        })?;
        self.conn
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('replica_id', ?1)",
                [&id[..]],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The files that hold `chunk` in their current content: (entry, offset).
    pub fn chunk_locations(&self, chunk: &Hash) -> Result<Vec<(Entry, u64)>> {
        let mut found: Vec<(Entry, u64)> = self
            .latests_by_hash(chunk)?
            .into_iter()
            .filter(|e| e.size > 0)
            .map(|e| (e, 0))
            .collect();
        let sql = format!(
            "SELECT {ENTRY_COLUMNS}, cc.offset FROM content_chunks AS cc \
             JOIN entries AS e ON e.hash = cc.content \
             WHERE cc.chunk = ?1 AND e.kind = 0 \
             AND e.seq = (SELECT MAX(seq) FROM entries WHERE path = e.path) LIMIT 8"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([&chunk.0[..]], |row| {
                Ok((entry_from_row(row)?, row.get::<_, i64>(14)? as u64))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            found.push(row.map_err(|e| self.err(e))?);
        }
        Ok(found)
    }

    /// Whether any file this history has recorded held `chunk`: most chunks of a
    /// new file are not here, and this answers that from the indexes alone.
    pub fn may_hold_chunk(&self, chunk: &Hash) -> Result<bool> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM content_chunks WHERE chunk = ?1) \
                 OR EXISTS (SELECT 1 FROM entries WHERE hash = ?1 AND kind = 0)",
            )
            .and_then(|mut stmt| stmt.query_row([&chunk.0[..]], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// The last sequence number received from `peer`, and the root it was last
    /// seen at (local peers only).
    pub fn remote_state(&self, peer: &PeerId) -> Result<Option<(u64, Option<String>)>> {
        self.conn
            .query_row(
                "SELECT last_seq, root FROM remote_peers WHERE peer = ?1",
                [&peer.0[..]],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Every peer some of whose history was received here.
    pub fn remote_peers(&self) -> Result<Vec<PeerId>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT peer FROM remote_peers")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| peer_column(r, 0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// The sequence numbers (this history's, `peer`'s) at which both sides were
    /// last found identical; `None` if never.
    pub fn identical_marks(&self, peer: &PeerId) -> Result<Option<IdenticalMarks>> {
        self.conn
            .prepare_cached(
                "SELECT identical_seq, identical_remote_seq FROM remote_peers \
                 WHERE peer = ?1 AND (identical_seq > 0 OR identical_remote_seq > 0)",
            )
            .and_then(|mut stmt| {
                stmt.query_row([&peer.0[..]], |r| {
                    Ok(IdenticalMarks {
                        local_seq: r.get::<_, i64>(0)? as u64,
                        remote_seq: r.get::<_, i64>(1)? as u64,
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// Notes that this folder and `peer` were found identical: now, with
    /// everything received from `peer` so far.
    pub fn mark_identical(&mut self, peer: &PeerId) -> Result<()> {
        let local_seq = self.last_seq()?;
        self.conn
            .execute(
                "UPDATE remote_peers SET identical_seq = ?2, identical_remote_seq = last_seq \
                 WHERE peer = ?1",
                params![&peer.0[..], local_seq as i64],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The current entries of the paths with an entry after `marks`, here or in
    /// `peer`'s history: (mine, theirs).
    pub fn latest_changed_since(
        &self,
        peer: &PeerId,
        marks: IdenticalMarks,
    ) -> Result<(Vec<Entry>, Vec<Entry>)> {
        let [mine, theirs] = changed_since_queries();
        let params = params![&peer.0[..], marks.local_seq as i64, marks.remote_seq as i64];
        let mine = self.query_entries(&mine, params)?;
        let theirs = self.query_entries(&theirs, params)?;
        Ok((mine, theirs))
    }

    /// Whether a local peer with history was ever synced at `root`.
    pub fn knows_root(&self, root: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT 1 FROM remote_peers WHERE root = ?1 AND last_seq > 0 LIMIT 1",
                [root],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(|e| self.err(e))
    }

    /// Stores entries received from `peer` (in its sequence order) and how far
    /// its history has now been received.
    pub fn store_remote(
        &mut self,
        peer: &PeerId,
        entries: &[Entry],
        last_seq: u64,
        root: Option<&str>,
    ) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| classify(&path, e))?;
        let stored = (|| {
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO remote_entries (peer, seq, path, kind, size, mtime_ns, \
                 mode, hash, link_target, peerid, author_peerid, author_utime_ns, utime_ns) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for e in entries {
                insert.execute(params![
                    &peer.0[..],
                    e.seq as i64,
                    e.path,
                    e.kind.code(),
                    e.size as i64,
                    e.mtime_ns,
                    e.mode,
                    e.hash.as_ref().map(|h| &h.0[..]),
                    e.link_target,
                    &e.peerid.0[..],
                    &e.author_peerid.0[..],
                    e.author_utime_ns,
                    e.utime_ns,
                ])?;
            }
            tx.execute(
                "INSERT INTO remote_peers (peer, last_seq, root) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (peer) DO UPDATE SET last_seq = excluded.last_seq, \
                 root = COALESCE(excluded.root, root)",
                params![&peer.0[..], last_seq as i64, root],
            )?;
            Ok(())
        })();
        stored
            .and_then(|()| tx.commit())
            .map_err(|e| classify(&path, e))
    }

    /// The current entry of every path in `peer`'s history as received.
    pub fn remote_latest_all(&self, peer: &PeerId) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {REMOTE_COLUMNS} FROM remote_entries WHERE peer = ?1 AND seq IN \
             (SELECT MAX(seq) FROM remote_entries WHERE peer = ?1 GROUP BY path)"
        );
        self.query_entries(&sql, [&peer.0[..]])
    }

    /// Every version of `path` in `peer`'s history as received, newest first.
    /// (Left to itself, SQLite walks the primary key for the ORDER BY: a full scan.)
    pub fn remote_history(&self, peer: &PeerId, path: &str) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {REMOTE_COLUMNS} FROM remote_entries INDEXED BY remote_entries_by_path \
             WHERE peer = ?1 AND path = ?2 ORDER BY seq DESC"
        );
        self.query_entries(&sql, params![&peer.0[..], path])
    }

    /// What was recorded of the dumb device `device`.
    pub fn device_records(&self, device: &PeerId) -> Result<Vec<DeviceRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, path, kind, size, mtime_ns, hash FROM device_files WHERE device = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([&device.0[..]], |row| {
                let kind: i64 = row.get(2)?;
                let hash: Option<Vec<u8>> = row.get(5)?;
                Ok(DeviceRecord {
                    key: row.get(0)?,
                    path: row.get(1)?,
                    kind: Kind::from_code(kind).ok_or_else(|| bad_column(2, "kind"))?,
                    size: row.get::<_, i64>(3)? as u64,
                    mtime_ns: row.get(4)?,
                    hash: match hash {
                        Some(bytes) => {
                            Some(Hash::from_slice(&bytes).ok_or_else(|| bad_column(5, "hash"))?)
                        }
                        None => None,
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Updates what is recorded of `device` (at `root`) in one transaction.
    pub fn update_device_records(
        &mut self,
        device: &PeerId,
        root: &str,
        upserts: &[DeviceRecord],
        removed_keys: &[String],
    ) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| classify(&path, e))?;
        let updated = (|| {
            tx.execute(
                "INSERT OR REPLACE INTO devices (device, root) VALUES (?1, ?2)",
                params![&device.0[..], root],
            )?;
            let mut remove =
                tx.prepare_cached("DELETE FROM device_files WHERE device = ?1 AND key = ?2")?;
            for key in removed_keys {
                remove.execute(params![&device.0[..], key])?;
            }
            let mut upsert = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_files (device, key, path, kind, size, mtime_ns, \
                 hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for r in upserts {
                upsert.execute(params![
                    &device.0[..],
                    r.key,
                    r.path,
                    r.kind.code(),
                    r.size as i64,
                    r.mtime_ns,
                    r.hash.as_ref().map(|h| &h.0[..]),
                ])?;
            }
            Ok(())
        })();
        updated
            .and_then(|()| tx.commit())
            .map_err(|e| classify(&path, e))
    }

    /// Whether a dumb device was ever synced at `root`.
    pub fn knows_device_root(&self, root: &str) -> Result<bool> {
        self.conn
            .query_row("SELECT 1 FROM devices WHERE root = ?1", [root], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
            .map_err(|e| self.err(e))
    }

    /// Number of distinct chunks listed for multi-chunk contents.
    pub fn chunk_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }
}

/// Sequence numbers at which a folder and a peer were found identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdenticalMarks {
    pub local_seq: u64,
    pub remote_seq: u64,
}

/// Makes cached statements stay prepared. The default cache of 16 is fewer than
/// the queries a sync cycles through. And without the query planner stability
/// guarantee, SQLite marks a statement whose plan might depend on a bound value
/// (an ORDER BY, a key of a WITHOUT ROWID table) to be prepared again once its
/// bindings are cleared, which the cache does on every return: most of a first
/// sync's CPU time went into parsing the same few queries.
fn cache_statements(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(64);
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map(drop)
}

fn write_records(tx: &rusqlite::Transaction<'_>, records: &[Record]) -> rusqlite::Result<Vec<u64>> {
    let mut insert_entry = tx.prepare_cached(
        "INSERT INTO entries (path, kind, size, mtime_ns, mode, inode, ctime_ns, hash, link_target, \
         peerid, author_peerid, author_utime_ns, utime_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let mut has_chunk_list =
        tx.prepare_cached("SELECT 1 FROM content_chunks WHERE content = ?1 LIMIT 1")?;
    let mut insert_chunk =
        tx.prepare_cached("INSERT OR IGNORE INTO chunks (hash, size) VALUES (?1, ?2)")?;
    let mut insert_content_chunk = tx.prepare_cached(
        "INSERT INTO content_chunks (content, idx, chunk, offset) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut refresh =
        tx.prepare_cached("UPDATE entries SET inode = ?2, ctime_ns = ?3 WHERE seq = ?1")?;
    let mut seqs = Vec::new();
    for record in records {
        match record {
            Record::Append { entry: e, chunks } => {
                insert_entry.execute(params![
                    e.path,
                    e.kind.code(),
                    e.size as i64,
                    e.mtime_ns,
                    e.mode,
                    e.inode as i64,
                    e.ctime_ns,
                    e.hash.as_ref().map(|h| &h.0[..]),
                    e.link_target,
                    &e.peerid.0[..],
                    &e.author_peerid.0[..],
                    e.author_utime_ns,
                    e.utime_ns,
                ])?;
                seqs.push(tx.last_insert_rowid() as u64);
                // A one-chunk content is its own chunk: the entry already says it all.
                if let (Some(content), true) = (e.hash, chunks.len() > 1)
                    && !has_chunk_list.exists([&content.0[..]])?
                {
                    for (idx, chunk) in chunks.iter().enumerate() {
                        insert_chunk.execute(params![&chunk.hash.0[..], chunk.len])?;
                        insert_content_chunk.execute(params![
                            &content.0[..],
                            idx as i64,
                            &chunk.hash.0[..],
                            chunk.offset as i64
                        ])?;
                    }
                }
            }
            Record::RefreshStat {
                seq,
                inode,
                ctime_ns,
            } => {
                refresh.execute(params![*seq as i64, *inode as i64, ctime_ns])?;
            }
        }
    }
    Ok(seqs)
}

fn bad_column(index: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Blob,
        format!("invalid {what}").into(),
    )
}

fn hash_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Hash> {
    let bytes: Vec<u8> = row.get(index)?;
    Hash::from_slice(&bytes).ok_or_else(|| bad_column(index, "hash"))
}

// Blobs are read in place (`get_ref`), not copied into a `Vec` first.
fn peer_column(row: &Row<'_>, index: usize) -> rusqlite::Result<PeerId> {
    let bytes = row.get_ref(index)?.as_blob()?;
    PeerId::from_slice(bytes).ok_or_else(|| bad_column(index, "peer id"))
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<Entry> {
    let hash = match row.get_ref(8)?.as_blob_or_null()? {
        Some(bytes) => Some(Hash::from_slice(bytes).ok_or_else(|| bad_column(8, "hash"))?),
        None => None,
    };
    Ok(Entry {
        seq: row.get::<_, i64>(0)? as u64,
        path: row.get(1)?,
        kind: Kind::from_code(row.get(2)?).ok_or_else(|| bad_column(2, "kind"))?,
        size: row.get::<_, i64>(3)? as u64,
        mtime_ns: row.get(4)?,
        mode: row.get(5)?,
        inode: row.get::<_, i64>(6)? as u64,
        ctime_ns: row.get(7)?,
        hash,
        link_target: row.get(9)?,
        peerid: peer_column(row, 10)?,
        author_peerid: peer_column(row, 11)?,
        author_utime_ns: row.get(12)?,
        utime_ns: row.get(13)?,
    })
}

/// Turns SQLite's errors into the ones a user can act on.
pub(crate) fn classify(path: &Path, e: rusqlite::Error) -> Error {
    let path = path.to_path_buf();
    match &e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Error::DatabaseLocked(path),
            ErrorCode::DiskFull => Error::DiskFull(path),
            ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => Error::CorruptDatabase {
                path,
                reason: e.to_string(),
            },
            _ => Error::Database { path, source: e },
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => Error::CorruptDatabase {
            path,
            reason: e.to_string(),
        },
        _ => Error::Database { path, source: e },
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Asks the kernel to read the database (and its WAL) into the page cache in
/// the background: a sync looks up paths all over it, and on a cold cache each
/// lookup would otherwise wait for a random read (planning 200 changed paths of
/// a 20k-file folder: 80 ms of such waits). Databases too large to be worth it
/// are left alone; a failure only loses the hint.
fn read_ahead(db: &Path) {
    const MAX_READ_AHEAD: u64 = 256 << 20;
    for path in [db, &wal_path(db)] {
        let Ok(file) = std::fs::File::open(path) else {
            continue;
        };
        if file.metadata().is_ok_and(|m| m.len() <= MAX_READ_AHEAD) {
            // SAFETY: a plain advice call on a descriptor this function owns.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn entry(path: &str, kind: Kind, content: &[u8]) -> Entry {
        let peer = PeerId([7; 32]);
        Entry {
            seq: 0,
            path: path.to_string(),
            kind,
            size: content.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            mode: 0o644,
            inode: 42,
            ctime_ns: 1,
            hash: (kind == Kind::File).then(|| Hash::of(content)),
            link_target: None,
            peerid: peer,
            author_peerid: peer,
            author_utime_ns: 5,
            utime_ns: 5,
        }
    }

    fn append(store: &mut HistoryStore, entries: &[Entry]) -> Vec<u64> {
        let records: Vec<Record> = entries
            .iter()
            .map(|e| Record::Append {
                entry: e.clone(),
                chunks: Vec::new(),
            })
            .collect();
        store.write_batch(&records).unwrap()
    }

    #[test]
    fn queries_see_the_latest_version_of_each_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = HistoryStore::open(&dir.path().join("h.db")).unwrap();
        let seqs = append(
            &mut store,
            &[
                entry("a", Kind::File, b"one"),
                entry("b", Kind::File, b"one"),
                entry("a", Kind::File, b"two"),
                entry("b", Kind::Deleted, b""),
            ],
        );
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!(
            store.latest_by_path("a").unwrap().unwrap().hash,
            Some(Hash::of(b"two"))
        );
        assert_eq!(
            store.latest_by_path("b").unwrap().unwrap().kind,
            Kind::Deleted
        );
        assert!(store.latest_by_path("c").unwrap().is_none());
        // "one" is no longer anyone's current content; "two" is a's.
        assert!(store.latests_by_hash(&Hash::of(b"one")).unwrap().is_empty());
        let holders = store.latests_by_hash(&Hash::of(b"two")).unwrap();
        assert_eq!(
            holders.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        let since: Vec<u64> = store
            .changes_since(2, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(since, vec![3, 4]);
        let history: Vec<u64> = store.history("a").unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(history, vec![3, 1]);
        assert_eq!(store.latest_all().unwrap().len(), 2);
        assert_eq!(store.latest_existing().unwrap()[0].path, "a");
        assert_eq!(store.latest_existing().unwrap().len(), 1);
        assert_eq!(store.last_seq().unwrap(), 4);
    }

    #[test]
    fn paths_changed_since_the_marks_are_found_by_sequence_not_by_reading_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::open(&dir.path().join("h.db")).unwrap();
        for sql in changed_since_queries() {
            let mut explain = store
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let plan: Vec<String> = explain
                .query_map(params![&[0u8; 32][..], 0, 0], |row| row.get(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(
                !plan.iter().any(|step| step.starts_with("SCAN")),
                "{plan:?}"
            );
        }
    }

    #[test]
    fn a_short_wal_outlives_its_store_and_a_long_one_is_folded_in() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("h.db");
        let wal_len = || fs::metadata(wal_path(&db)).map_or(0, |m| m.len());
        let mut store = HistoryStore::open(&db).unwrap();
        append(&mut store, &[entry("first", Kind::File, b"one")]);
        drop(store);
        assert!(wal_len() > 0, "a short WAL is left for later");
        let mut store = HistoryStore::open(&db).unwrap();
        assert!(store.latest_by_path("first").unwrap().is_some());
        // Long paths fill pages quickly: past the fold threshold.
        let long: Vec<Entry> = (0..3000)
            .map(|i| entry(&format!("{i:04}/{}", "x".repeat(2000)), Kind::File, b"two"))
            .collect();
        append(&mut store, &long);
        assert!(wal_len() >= WAL_FOLDED_AT_CLOSE);
        drop(store);
        assert_eq!(wal_len(), 0, "a long WAL is folded in at close");
        let store = HistoryStore::open(&db).unwrap();
        assert_eq!(store.latest_all().unwrap().len(), 3001);
    }

    #[test]
    fn chunks_are_stored_once_per_distinct_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = HistoryStore::open(&dir.path().join("h.db")).unwrap();
        let shared = ChunkInfo {
            hash: Hash::of(b"shared"),
            offset: 0,
            len: 6,
        };
        let tail = |t: &[u8]| ChunkInfo {
            hash: Hash::of(t),
            offset: 6,
            len: t.len() as u32,
        };
        let records = vec![
            Record::Append {
                entry: entry("x", Kind::File, b"sharedX"),
                chunks: vec![shared, tail(b"X")],
            },
            Record::Append {
                entry: entry("y", Kind::File, b"sharedY"),
                chunks: vec![shared, tail(b"Y")],
            },
            Record::Append {
                entry: entry("z", Kind::File, b"sharedX"),
                chunks: vec![shared, tail(b"X")],
            },
        ];
        store.write_batch(&records).unwrap();
        assert_eq!(store.chunk_count().unwrap(), 3);
        assert_eq!(
            store.chunks_of(&Hash::of(b"sharedX")).unwrap(),
            vec![shared, tail(b"X")]
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_reported_corrupt_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let garbage = vec![0x5a_u8; 8192];
        std::fs::write(&path, &garbage).unwrap();
        let err = HistoryStore::open(&path).err().unwrap();
        assert!(matches!(err, Error::CorruptDatabase { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn a_full_disk_is_reported_and_loses_no_committed_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = HistoryStore::open(&dir.path().join("h.db")).unwrap();
        append(&mut store, &[entry("kept", Kind::File, b"k")]);
        // The database may not grow any more: as good as a full disk to SQLite.
        let pages: i64 = store
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        store
            .conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
        let many: Vec<Record> = (0..2000)
            .map(|i| Record::Append {
                entry: entry(&format!("f{i:05}"), Kind::File, format!("{i}").as_bytes()),
                chunks: Vec::new(),
            })
            .collect();
        let err = store.write_batch(&many).unwrap_err();
        assert!(matches!(err, Error::DiskFull(_)), "{err}");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(store.last_seq().unwrap(), 1);
        assert!(store.latest_by_path("kept").unwrap().is_some());
    }

    #[test]
    fn an_older_history_gets_the_chunk_list_hashes_of_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let mut store = HistoryStore::open(&path).unwrap();
        let chunk = |bytes: &[u8], offset: u64| ChunkInfo {
            hash: Hash::of(bytes),
            offset,
            len: bytes.len() as u32,
        };
        let list = vec![chunk(b"first", 0), chunk(b"second", 5)];
        // As the schema before REHASH_STEP recorded them: BLAKE3 of the whole.
        store
            .write_batch(&[
                Record::Append {
                    entry: entry("two", Kind::File, b"firstsecond"),
                    chunks: list.clone(),
                },
                Record::Append {
                    entry: entry("one", Kind::File, b"single"),
                    chunks: Vec::new(),
                },
            ])
            .unwrap();
        let peer = PeerId([9; 32]);
        let theirs = Entry {
            seq: 1,
            ..entry("two", Kind::File, b"firstsecond")
        };
        store.store_remote(&peer, &[theirs], 1, None).unwrap();
        store
            .conn
            .pragma_update(None, "user_version", REHASH_STEP as i64)
            .unwrap();
        drop(store);

        let store = HistoryStore::open(&path).unwrap();
        let rehashed = chunk_list_hash(list.iter().map(|c| c.hash));
        assert_eq!(
            store.latest_by_path("two").unwrap().unwrap().hash,
            Some(rehashed)
        );
        assert_eq!(store.chunks_of(&rehashed).unwrap(), list);
        assert!(
            store
                .chunks_of(&Hash::of(b"firstsecond"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.latest_by_path("one").unwrap().unwrap().hash,
            Some(Hash::of(b"single"))
        );
        // The peer's history, hashed the old way, is asked for again from its start.
        assert!(store.remote_latest_all(&peer).unwrap().is_empty());
        assert_eq!(store.remote_state(&peer).unwrap().map(|s| s.0), Some(0));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        drop(HistoryStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = HistoryStore::open(&path).err().unwrap();
        assert!(matches!(err, Error::NewerSchema { found: 99, .. }), "{err}");
    }
}
