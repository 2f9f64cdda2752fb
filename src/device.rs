//! Per-device state: where it lives (`--home`, `LATUS_HOME`, XDG dirs), peer ids
//! and their readable form, and the config file.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::identity::Identity;

const CONFIG_FILE: &str = "config.toml";

/// 32 bytes naming a device (the BLAKE3 hash of its certificate, see
/// [`crate::identity`]) or a folder replica (random).
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

    /// The id of the device whose certificate (DER) this is.
    pub fn of_certificate(cert_der: &[u8]) -> Self {
        PeerId(*blake3::hash(cert_der).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(PeerId(bytes.try_into().ok()?))
    }

    /// The first group of the readable form: enough to tell a user's devices apart.
    pub fn short(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

/// Readable form: unpadded base32 (no 0/1/8/9 look-alikes) in four dash-separated
/// groups of 13 characters, each followed by a check character (Luhn mod 32), so a
/// mistyped id is refused rather than trusted.
impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encoded = data_encoding::BASE32_NOPAD.encode(&self.0);
        let groups: Vec<String> = encoded
            .as_bytes()
            .chunks(GROUP)
            .map(|g| {
                let group = std::str::from_utf8(g).unwrap_or_default();
                format!("{group}{}", luhn32(group) as char)
            })
            .collect();
        f.write_str(&groups.join("-"))
    }
}

/// Base32 characters per group of the readable form.
const GROUP: usize = 13;
const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The Luhn mod 32 check character of a group of base32 characters.
fn luhn32(group: &str) -> u8 {
    let mut sum = 0;
    let mut factor = 2;
    for c in group.bytes().rev() {
        let code = BASE32_ALPHABET.iter().position(|a| *a == c).unwrap_or(0);
        let addend = factor * code;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    BASE32_ALPHABET[(32 - sum % 32) % 32]
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// Accepts the readable form, in any case, with or without dashes; its check
/// characters must be right. The 52 characters without checks are accepted too.
impl FromStr for PeerId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let compact: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let base32 = match compact.len() {
            len if len == 4 * (GROUP + 1) && compact.is_ascii() => {
                let mut base32 = String::new();
                for checked in compact.as_bytes().chunks(GROUP + 1) {
                    let group = std::str::from_utf8(&checked[..GROUP]).unwrap_or_default();
                    if luhn32(group) != checked[GROUP] {
                        return Err(Error::InvalidPeerId(
                            s.to_string(),
                            "a check character does not match (a typo?)",
                        ));
                    }
                    base32.push_str(group);
                }
                base32
            }
            _ => compact,
        };
        let bytes = data_encoding::BASE32_NOPAD
            .decode(base32.as_bytes())
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
    /// The device database, the daemon's address, status and logs.
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

    /// The device's peer id, if `init` has run.
    pub fn peer_id(&self) -> Result<Option<PeerId>> {
        Ok(Identity::load(&self.config_dir)?.map(|identity| identity.peer_id()))
    }

    /// Creates the state directories and the device's identity unless they exist;
    /// returns the peer id and whether it was created now.
    pub fn init(&self) -> Result<(PeerId, bool)> {
        for dir in [&self.config_dir, &self.data_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let (identity, created) = Identity::load_or_create(&self.config_dir)?;
        Ok((identity.peer_id(), created))
    }

    /// The device's identity; an error telling to run `latus init` if there is none.
    pub fn identity(&self) -> Result<Identity> {
        Identity::load(&self.config_dir)?.ok_or_else(|| Error::DeviceState {
            path: self.config_dir.clone(),
            reason: "this device has no identity yet: run `latus init`".into(),
        })
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
        assert_eq!(text.len(), 56 + 3);
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert_eq!(
            text.to_lowercase()
                .replace('-', "")
                .parse::<PeerId>()
                .unwrap(),
            id
        );
        assert!("not-a-peer".parse::<PeerId>().is_err());
        // Without the check characters it is still the same id.
        let unchecked: String = text.split('-').map(|group| &group[..GROUP]).collect();
        assert_eq!(unchecked.parse::<PeerId>().unwrap(), id);
    }

    #[test]
    fn a_mistyped_peer_id_is_refused() {
        let text = PeerId::random().unwrap().to_string();
        for at in [0, 5, 20, 58] {
            let mut typo = text.clone().into_bytes();
            typo[at] = if typo[at] == b'A' { b'B' } else { b'A' };
            let typo = String::from_utf8(typo).unwrap();
            let err = typo.parse::<PeerId>().unwrap_err();
            assert!(err.to_string().contains("check"), "{typo}: {err}");
        }
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
