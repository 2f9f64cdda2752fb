//! What this device serves and to whom: the peers it knows (their pinned ids,
//! names and addresses), the folders it syncs (an id every device of the group
//! uses, and the local path), and which peers each folder is shared with (the
//! seed's "groupid and security": a peer sees and may change only those).
//! Kept in `device.db` in the device's data directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::device::PeerId;
use crate::error::{Error, Result};

pub const DB_FILE: &str = "device.db";
const SCHEMA: &str = r#"
    CREATE TABLE IF NOT EXISTS peers (
        id BLOB PRIMARY KEY,
        name TEXT NOT NULL,
        -- HOST:PORT, one per line.
        addrs TEXT NOT NULL,
        -- The bare XMPP JID of the peer's owner when it is another account (a contact).
        jid TEXT
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS folders (
        id TEXT PRIMARY KEY,
        path TEXT NOT NULL UNIQUE
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS folder_peers (
        folder TEXT NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
        peer BLOB NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        PRIMARY KEY (folder, peer)
    ) WITHOUT ROWID;
"#;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownPeer {
    #[serde(serialize_with = "as_text")]
    pub id: PeerId,
    pub name: String,
    pub addrs: Vec<String>,
    /// The XMPP account (bare JID) whose stanzas may speak for this peer when it
    /// is not this device's own account.
    pub jid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedFolder {
    pub id: String,
    pub path: PathBuf,
    #[serde(serialize_with = "all_as_text")]
    pub peers: Vec<PeerId>,
}

fn as_text<S: serde::Serializer>(id: &PeerId, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn all_as_text<S: serde::Serializer>(ids: &[PeerId], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(ids.iter().map(ToString::to_string))
}

pub struct Shares {
    conn: Connection,
    path: PathBuf,
}

impl Shares {
    /// Opens (creating) the device's share list in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|e| db_error(&path, e))?;
        let shares = Shares { conn, path };
        shares
            .conn
            .busy_timeout(Duration::from_secs(3))
            .and_then(|()| shares.conn.execute_batch("PRAGMA foreign_keys = ON;"))
            .and_then(|()| shares.conn.execute_batch(SCHEMA))
            .and_then(|()| shares.add_jid_column())
            .map_err(|e| shares.err(e))?;
        Ok(shares)
    }

    /// `device.db` files made before peers had a JID get the column.
    fn add_jid_column(&self) -> rusqlite::Result<()> {
        let has_jid = self
            .conn
            .prepare("SELECT 1 FROM pragma_table_info('peers') WHERE name = 'jid'")?
            .exists([])?;
        if !has_jid {
            self.conn
                .execute_batch("ALTER TABLE peers ADD COLUMN jid TEXT")?;
        }
        Ok(())
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        db_error(&self.path, e)
    }

    /// Adds a peer, or updates its name and adds addresses if it is known.
    pub fn add_peer(
        &self,
        id: &PeerId,
        name: Option<&str>,
        addrs: &[String],
        jid: Option<&str>,
    ) -> Result<KnownPeer> {
        for addr in addrs {
            check_addr(addr)?;
        }
        let mut peer = self.peer(id)?.unwrap_or_else(|| KnownPeer {
            id: *id,
            name: id.short(),
            addrs: Vec::new(),
            jid: None,
        });
        if let Some(name) = name {
            peer.name = name.to_string();
        }
        if let Some(jid) = jid {
            let bare = crate::xmpp::XmppConfig {
                jid: jid.to_string(),
                server: None,
            }
            .check()?;
            peer.jid = Some(bare.to_string());
        }
        for addr in addrs {
            if !peer.addrs.contains(addr) {
                peer.addrs.push(addr.clone());
            }
        }
        self.conn
            .execute(
                "INSERT INTO peers (id, name, addrs, jid) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, addrs = excluded.addrs, \
                 jid = excluded.jid",
                params![&id.0[..], peer.name, peer.addrs.join("\n"), peer.jid],
            )
            .map_err(|e| self.err(e))?;
        Ok(peer)
    }

    /// Forgets a peer and every share with it; `false` if it was not known.
    pub fn remove_peer(&self, id: &PeerId) -> Result<bool> {
        let removed = self
            .conn
            .execute("DELETE FROM peers WHERE id = ?1", [&id.0[..]])
            .map_err(|e| self.err(e))?;
        Ok(removed > 0)
    }

    pub fn peer(&self, id: &PeerId) -> Result<Option<KnownPeer>> {
        self.conn
            .query_row(
                "SELECT id, name, addrs, jid FROM peers WHERE id = ?1",
                [&id.0[..]],
                peer_from_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn peers(&self) -> Result<Vec<KnownPeer>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, addrs, jid FROM peers ORDER BY name, id")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], peer_from_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Adds a folder: `id` names it on every device of the group, `path` is where
    /// it is here (an existing directory).
    pub fn add_folder(&self, id: &str, path: &Path) -> Result<SharedFolder> {
        check_folder_id(id)?;
        let path = path.canonicalize().map_err(|e| Error::io(path, e))?;
        if !path.is_dir() {
            return Err(Error::NotADirectory(path));
        }
        let text = path.to_str().ok_or_else(|| Error::UnsafePath {
            path: path.to_string_lossy().into_owned(),
            reason: "a folder path must be valid UTF-8",
        })?;
        if let Some(other) = self
            .folders()?
            .into_iter()
            .find(|f| f.id != id && f.path == path)
        {
            return Err(Error::Config {
                path: self.path.clone(),
                reason: format!("{} is already folder {:?}", path.display(), other.id),
            });
        }
        self.conn
            .execute(
                "INSERT INTO folders (id, path) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET path = excluded.path",
                params![id, text],
            )
            .map_err(|e| self.err(e))?;
        self.folder(id)?
            .ok_or_else(|| Error::Internal(format!("folder {id:?} vanished")))
    }

    /// Shares folder `id` with a known peer.
    pub fn share(&self, id: &str, peer: &PeerId) -> Result<()> {
        if self.folder(id)?.is_none() {
            return Err(self.unknown(format!(
                "no folder {id:?}: add it first with `latus folder add`"
            )));
        }
        if self.peer(peer)?.is_none() {
            return Err(self.unknown(format!(
                "peer {peer} is not known: add it first with `latus peer add`"
            )));
        }
        self.conn
            .execute(
                "INSERT OR IGNORE INTO folder_peers (folder, peer) VALUES (?1, ?2)",
                params![id, &peer.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stops sharing folder `id` with `peer`; `false` if it was not shared with it.
    pub fn unshare(&self, id: &str, peer: &PeerId) -> Result<bool> {
        let removed = self
            .conn
            .execute(
                "DELETE FROM folder_peers WHERE folder = ?1 AND peer = ?2",
                params![id, &peer.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(removed > 0)
    }

    /// Forgets folder `id` and every share of it: this device no longer syncs
    /// it. Its files, and its history in `.latus/`, stay where they are.
    /// `false` if there was no such folder.
    pub fn remove_folder(&self, id: &str) -> Result<bool> {
        let removed = self
            .conn
            .execute("DELETE FROM folders WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(removed > 0)
    }

    fn unknown(&self, reason: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason,
        }
    }

    pub fn folder(&self, id: &str) -> Result<Option<SharedFolder>> {
        Ok(self.folders()?.into_iter().find(|f| f.id == id))
    }

    pub fn folders(&self) -> Result<Vec<SharedFolder>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.id, f.path, fp.peer FROM folders AS f \
                 LEFT JOIN folder_peers AS fp ON fp.folder = f.id ORDER BY f.id, fp.peer",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut folders: Vec<SharedFolder> = Vec::new();
        for row in rows {
            let (id, path, peer) = row.map_err(|e| self.err(e))?;
            if folders.last().is_none_or(|f| f.id != id) {
                folders.push(SharedFolder {
                    id,
                    path: PathBuf::from(path),
                    peers: Vec::new(),
                });
            }
            if let (Some(folder), Some(peer)) = (folders.last_mut(), peer) {
                let peer = PeerId::from_slice(&peer).ok_or_else(|| Error::CorruptDatabase {
                    path: self.path.clone(),
                    reason: "a peer id that is not 32 bytes".into(),
                })?;
                folder.peers.push(peer);
            }
        }
        Ok(folders)
    }

    /// The folders shared with `peer`: all it may see or change.
    pub fn folders_shared_with(&self, peer: &PeerId) -> Result<Vec<SharedFolder>> {
        let mut folders = self.folders()?;
        folders.retain(|f| f.peers.contains(peer));
        Ok(folders)
    }
}

fn peer_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KnownPeer> {
    let id = row.get_ref(0)?.as_blob()?;
    let id = PeerId::from_slice(id).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "a peer id that is not 32 bytes".into(),
        )
    })?;
    let addrs: String = row.get(2)?;
    Ok(KnownPeer {
        id,
        name: row.get(1)?,
        addrs: addrs.lines().map(str::to_string).collect(),
        jid: row.get(3)?,
    })
}

fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    Error::Database {
        path: path.to_path_buf(),
        source: e,
    }
}

/// A folder id: what every device of a group calls the folder. Letters, digits,
/// `.`, `_` and `-`, at most 64, starting with a letter or digit (never `..`).
pub fn check_folder_id(id: &str) -> Result<()> {
    let ok = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::UnsafePath {
            path: id.to_string(),
            reason: "a folder id is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        })
    }
}

/// `HOST:PORT` with a port number; the host is resolved when connecting.
fn check_addr(addr: &str) -> Result<()> {
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(())
    } else {
        Err(Error::UnsafePath {
            path: addr.to_string(),
            reason: "an address is HOST:PORT",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_folders_are_kept_and_shares_follow_their_peer() {
        let dir = tempfile::tempdir().unwrap();
        let shares = Shares::open(dir.path()).unwrap();
        let (a, b) = (PeerId([1; 32]), PeerId([2; 32]));
        shares
            .add_peer(&a, Some("laptop"), &["127.0.0.1:22000".into()], None)
            .unwrap();
        shares
            .add_peer(&a, None, &["[::1]:22000".into()], Some("Bob@Example.org"))
            .unwrap();
        shares.add_peer(&b, None, &[], None).unwrap();
        let music = dir.path().join("music");
        std::fs::create_dir(&music).unwrap();
        shares.add_folder("music", &music).unwrap();
        shares.share("music", &a).unwrap();
        shares.share("music", &a).unwrap();

        let reopened = Shares::open(dir.path()).unwrap();
        let peer_a = reopened.peer(&a).unwrap().unwrap();
        assert_eq!(peer_a.name, "laptop");
        assert_eq!(peer_a.addrs, vec!["127.0.0.1:22000", "[::1]:22000"]);
        // JIDs are kept in their normalised (lower-case) form.
        assert_eq!(peer_a.jid.as_deref(), Some("bob@example.org"));
        assert_eq!(reopened.folders_shared_with(&a).unwrap().len(), 1);
        assert!(reopened.folders_shared_with(&b).unwrap().is_empty());
        assert_eq!(reopened.folder("music").unwrap().unwrap().peers, vec![a]);

        assert!(reopened.remove_peer(&a).unwrap());
        assert!(!reopened.remove_peer(&a).unwrap());
        assert!(reopened.folder("music").unwrap().unwrap().peers.is_empty());
    }

    #[test]
    fn a_folder_is_unshared_with_one_peer_or_removed_with_its_shares() {
        let dir = tempfile::tempdir().unwrap();
        let shares = Shares::open(dir.path()).unwrap();
        let (a, b) = (PeerId([1; 32]), PeerId([2; 32]));
        shares.add_peer(&a, None, &[], None).unwrap();
        shares.add_peer(&b, None, &[], None).unwrap();
        for id in ["music", "photos"] {
            let path = dir.path().join(id);
            std::fs::create_dir(&path).unwrap();
            shares.add_folder(id, &path).unwrap();
            shares.share(id, &a).unwrap();
            shares.share(id, &b).unwrap();
        }

        assert!(shares.unshare("music", &a).unwrap());
        assert!(!shares.unshare("music", &a).unwrap());
        assert!(!shares.unshare("nope", &b).unwrap());
        assert_eq!(shares.folder("music").unwrap().unwrap().peers, vec![b]);
        assert_eq!(shares.folder("photos").unwrap().unwrap().peers, vec![a, b]);

        assert!(shares.remove_folder("photos").unwrap());
        assert!(!shares.remove_folder("photos").unwrap());
        let left: Vec<String> = shares
            .folders()
            .unwrap()
            .into_iter()
            .map(|f| f.id)
            .collect();
        assert_eq!(left, vec!["music"]);
        assert_eq!(shares.folders_shared_with(&a).unwrap().len(), 0);
        // Its files stay; added again, it is shared with no one until told.
        assert!(dir.path().join("photos").is_dir());
        shares
            .add_folder("photos", &dir.path().join("photos"))
            .unwrap();
        assert!(shares.folder("photos").unwrap().unwrap().peers.is_empty());
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let shares = Shares::open(dir.path()).unwrap();
        let peer = PeerId([3; 32]);
        for addr in ["nohost", ":22000", "host:0", "host:99999"] {
            assert!(
                shares.add_peer(&peer, None, &[addr.into()], None).is_err(),
                "{addr}"
            );
        }
        for jid in ["example.org", "a@b@c", ""] {
            assert!(
                shares.add_peer(&peer, None, &[], Some(jid)).is_err(),
                "{jid}"
            );
        }
        for id in [
            "",
            "a/b",
            "..",
            ".hidden",
            "x".repeat(65).as_str(),
            "spa ce",
        ] {
            assert!(shares.add_folder(id, dir.path()).is_err(), "{id:?}");
        }
        assert!(shares.add_folder("f", &dir.path().join("missing")).is_err());
        let err = shares.share("nope", &peer).unwrap_err().to_string();
        assert!(err.contains("latus folder add"), "{err}");
        shares.add_folder("f", dir.path()).unwrap();
        let err = shares.share("f", &peer).unwrap_err().to_string();
        assert!(err.contains("latus peer add"), "{err}");
        let err = shares.add_folder("g", dir.path()).unwrap_err().to_string();
        assert!(err.contains("already folder"), "{err}");
    }
}
