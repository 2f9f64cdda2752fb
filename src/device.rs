//! Per-device state: where it lives (`--home`, `LATUS_HOME`, XDG dirs), the device's
//! peer id and its config file.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};

const PEER_ID_FILE: &str = "peer_id";
const CONFIG_FILE: &str = "config.toml";

/// A device's identity. For now 32 random bytes; a later issue derives it from the
/// device certificate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| Error::DeviceState {
            path: PathBuf::new(),
            reason: format!("no randomness available: {e}"),
        })?;
        Ok(PeerId(bytes))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(PeerId(bytes.try_into().ok()?))
    }

    /// The first group of the readable form: enough to tell a user's devices apart.
    pub fn short(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

/// Readable form: unpadded base32 (no 0/1/8/9 look-alikes), in four dash-separated groups.
impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encoded = data_encoding::BASE32_NOPAD.encode(&self.0);
        let groups: Vec<&str> = encoded
            .as_bytes()
            .chunks(13)
            .map(|g| std::str::from_utf8(g).unwrap_or_default())
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let compact: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(compact.as_bytes())
            .map_err(|_| Error::InvalidPeerId(s.to_string(), "not base32"))?;
        PeerId::from_slice(&bytes).ok_or(Error::InvalidPeerId(s.to_string(), "not 32 bytes"))
    }
}

/// Settings from `config.toml` in the config directory. Every field is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub scan: ScanConfig,
    #[serde(default)]
    pub sync: SyncConfig,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// A sync that would delete more than this share of a folder's files stops (50).
    pub mass_delete_percent: Option<u32>,
    /// …but only in folders of at least this many files (10).
    pub mass_delete_min_files: Option<usize>,
    /// Days a replaced or deleted version stays in `.latus/trash/` (30).
    pub trash_keep_days: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanConfig {
    /// Upper bound on the bytes read per second for hashing, in MB/s (10^6 bytes).
    pub max_read_mbps: Option<f64>,
    /// Hashing threads; default: twice the number of cores, at least 8.
    pub hash_threads: Option<usize>,
}

/// The directories holding a device's state.
#[derive(Debug, Clone)]
pub struct Home {
    /// Identity and `config.toml`.
    pub config_dir: PathBuf,
    /// Databases and logs (later issues).
    pub data_dir: PathBuf,
}

impl Home {
    /// `explicit` comes from `--home` or `LATUS_HOME`; without it, the XDG directories.
    pub fn locate(explicit: Option<&Path>) -> Result<Self> {
        if let Some(dir) = explicit {
            return Ok(Home {
                config_dir: dir.to_path_buf(),
                data_dir: dir.to_path_buf(),
            });
        }
        let dirs = directories::ProjectDirs::from("", "", "latus").ok_or(Error::NoHome)?;
        Ok(Home {
            config_dir: dirs.config_dir().to_path_buf(),
            data_dir: dirs.data_dir().to_path_buf(),
        })
    }

    fn peer_id_path(&self) -> PathBuf {
        self.config_dir.join(PEER_ID_FILE)
    }

    /// The device's peer id, if `init` has run.
    pub fn peer_id(&self) -> Result<Option<PeerId>> {
        let path = self.peer_id_path();
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<PeerId>()
                .map(Some)
                .map_err(|e| Error::DeviceState {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Creates the state directories and the peer id unless they exist; returns the
    /// peer id and whether it was created now.
    pub fn init(&self) -> Result<(PeerId, bool)> {
        if let Some(id) = self.peer_id()? {
            return Ok((id, false));
        }
        for dir in [&self.config_dir, &self.data_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let id = PeerId::random()?;
        let path = self.peer_id_path();
        // Written to a temp file and renamed so a crash never leaves a half-written id.
        let tmp = self.config_dir.join(format!(".{PEER_ID_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            writeln!(f, "{id}")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| Error::io(&path, e))?;
        Ok((id, true))
    }

    pub fn config(&self) -> Result<Config> {
        let path = self.config_dir.join(CONFIG_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::Config {
                path,
                reason: e.message().to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_its_readable_form() {
        let id = PeerId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 52 + 3);
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert_eq!(
            text.to_lowercase()
                .replace('-', "")
                .parse::<PeerId>()
                .unwrap(),
            id
        );
        assert!("not-a-peer".parse::<PeerId>().is_err());
    }

    #[test]
    fn init_is_stable_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path())).unwrap();
        let (first, created) = home.init().unwrap();
        assert!(created);
        let (again, created) = home.init().unwrap();
        assert!(!created);
        assert_eq!(first, again);
    }

    #[test]
    fn config_rejects_unknown_keys_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "[scan]\nmax_read_mbs = 3\n").unwrap();
        let err = Home::locate(Some(dir.path()))
            .unwrap()
            .config()
            .unwrap_err();
        assert!(err.to_string().contains("config.toml"), "{err}");
    }
}
