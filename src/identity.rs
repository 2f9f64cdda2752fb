//! The device's identity: a key pair and a self-signed certificate, made once by
//! `latus init`. The peer id is the BLAKE3 hash of the certificate, so a peer that
//! proves it holds the key of a certificate with that hash (mutual TLS) is that
//! device: no certificate authority is involved.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::device::PeerId;
use crate::error::{Error, Result};

const CERT_FILE: &str = "device.crt";
const KEY_FILE: &str = "device.key";
/// The name in the certificate; peers never check it (they pin the hash).
const CERT_NAME: &str = "latus";

/// A device's certificate and private key, both DER.
pub struct Identity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Identity {
    /// The peer id this certificate proves.
    pub fn peer_id(&self) -> PeerId {
        PeerId::of_certificate(&self.cert_der)
    }

    /// Loads the identity kept in `dir`; `None` if there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let cert_pem = match fs::read_to_string(&cert_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(cert_path, e)),
        };
        let key_pem = fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
        Ok(Some(Identity {
            cert_der: pem_body(&cert_path, &cert_pem, "CERTIFICATE")?,
            key_der: pem_body(&key_path, &key_pem, "PRIVATE KEY")?,
        }))
    }

    /// Loads the identity kept in `dir`, or makes one; `true` if made now.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool)> {
        if let Some(identity) = Self::load(dir)? {
            return Ok((identity, false));
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let made =
            rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()]).map_err(|e| {
                Error::DeviceState {
                    path: dir.to_path_buf(),
                    reason: format!("cannot make a certificate: {e}"),
                }
            })?;
        // The key first, readable by the user only; the certificate last, because
        // its presence is what says that the identity exists.
        write_new(
            &dir.join(KEY_FILE),
            made.signing_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join(CERT_FILE), made.cert.pem().as_bytes(), 0o644)?;
        Ok((
            Identity {
                cert_der: made.cert.der().to_vec(),
                key_der: made.signing_key.serialize_der(),
            },
            true,
        ))
    }
}

/// Writes `bytes` to `path` through a temp file and a rename, so a crash never
/// leaves half a file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.set_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::io(path, e))
}

/// The DER bytes of the one `label` block of a PEM file.
fn pem_body(path: &Path, text: &str, label: &str) -> Result<Vec<u8>> {
    let bad = |reason: &str| Error::DeviceState {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| bad("no PEM block"))? + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| bad("an unfinished PEM block"))?
        + start;
    let base64: String = text[start..stop].split_whitespace().collect();
    data_encoding::BASE64
        .decode(base64.as_bytes())
        .map_err(|_| bad("a PEM block that is not base64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_loaded_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (made, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (loaded, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(loaded.cert_der, made.cert_der);
        assert_eq!(loaded.key_der, made.key_der);
        assert_eq!(loaded.peer_id(), made.peer_id());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn two_identities_differ() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Identity::load_or_create(a.path()).unwrap().0;
        let b = Identity::load_or_create(b.path()).unwrap().0;
        assert_ne!(a.peer_id(), b.peer_id());
    }

    #[test]
    fn a_damaged_certificate_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(CERT_FILE), "garbage").unwrap();
        let err = Identity::load(dir.path()).err().unwrap();
        assert!(err.to_string().contains(CERT_FILE), "{err}");
    }
}
