//! Presence and small messages through an XMPP server: devices find each other
//! without any discovery server of ours.
//!
//! Every device of a user logs in to the user's XMPP account with a resource of
//! its own. Presence tells which devices are online; to each device that comes
//! online, a device announces its peer id and data-plane addresses
//! ([`stanza::Payload::Announce`]), and after each sync round it tells the devices
//! sharing a folder how far that folder's history reaches
//! ([`stanza::Payload::Changed`]), so a device that cannot be reached directly
//! still learns that it is behind. XMPP only says *where*: the daemon then dials
//! the address over the TLS data plane, which checks the certificate against the
//! pinned peer id, so a lying stanza leads to a refused connection, not to trust.
//!
//! Stanzas are accepted from the account's own other resources and from the
//! contacts recorded for known peers (`latus peer add --jid`); anything else is
//! logged and ignored.
//!
//! The client (`tokio-xmpp`) runs on a thread of its own with a single-threaded
//! runtime: its split receiver can lose a wake-up on a multi-threaded runtime,
//! and its reconnection task retries a refused password forever, so a failed
//! session is ended by dropping its whole runtime.

mod session;
pub mod stanza;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_xmpp::jid::BareJid;

use crate::device::{Home, PeerId};
use crate::error::{Error, Result};

pub use session::Connector;

const CONFIG_FILE: &str = "xmpp.toml";
const PASSWORD_FILE: &str = "xmpp.password";
/// For services: the password from the environment instead of the file.
pub const PASSWORD_ENV: &str = "LATUS_XMPP_PASSWORD";
/// The port of XMPP client connections (RFC 6120) when none is given.
pub const DEFAULT_PORT: u16 = 5222;

/// The account a device logs in to (`latus xmpp set`), from `xmpp.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    /// A bare JID, `user@example.org`.
    pub jid: String,
    /// HOST:PORT of the server; without it, the JID's domain (DNS SRV, then port 5222).
    pub server: Option<String>,
}

impl XmppConfig {
    pub fn check(&self) -> Result<BareJid> {
        let jid = BareJid::new(&self.jid).map_err(|e| invalid(&self.jid, &e.to_string()))?;
        if jid.node().is_none() {
            return Err(invalid(&self.jid, "it needs a user part (user@domain)"));
        }
        if let Some(server) = &self.server {
            server_host_port(server)?;
        }
        Ok(jid)
    }

    /// The account of this device, if `latus xmpp set` was run.
    pub fn load(home: &Home) -> Result<Option<Self>> {
        let path = home.config_dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let config: XmppConfig = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        config.check().map_err(|e| Error::Config {
            path,
            reason: e.to_string(),
        })?;
        Ok(Some(config))
    }

    /// Saves the account, and the password (if given) readable by the user only.
    pub fn save(&self, home: &Home, password: Option<&str>) -> Result<()> {
        self.check()?;
        std::fs::create_dir_all(&home.config_dir).map_err(|e| Error::io(&home.config_dir, e))?;
        let path = home.config_dir.join(CONFIG_FILE);
        let text = toml::to_string(self).map_err(|e| Error::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        if let Some(password) = password {
            write_private(&home.config_dir.join(PASSWORD_FILE), password.as_bytes())?;
        }
        Ok(())
    }

    /// Forgets the account and its password.
    pub fn remove(home: &Home) -> Result<bool> {
        let mut removed = false;
        for name in [CONFIG_FILE, PASSWORD_FILE] {
            let path = home.config_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(removed)
    }
}

/// The account's password: `$LATUS_XMPP_PASSWORD`, else the saved file.
pub fn password(home: &Home) -> Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV)
        && !password.is_empty()
    {
        return Ok(password);
    }
    let path = home.config_dir.join(PASSWORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim_end_matches(['\r', '\n']).to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Config {
            path,
            reason: format!(
                "no XMPP password: run `latus xmpp set JID --password-file FILE` or set {PASSWORD_ENV}"
            ),
        }),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Writes a file only its owner can read, created so from the start (no window
/// in which it is readable by others).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn invalid(jid: &str, reason: &str) -> Error {
    Error::Xmpp(format!("invalid JID {jid:?}: {reason}"))
}

/// Splits HOST:PORT (the port defaults to 5222).
pub(crate) fn server_host_port(server: &str) -> Result<(String, u16)> {
    let bad = |reason: &str| Error::Xmpp(format!("invalid server {server:?}: {reason}"));
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    match server.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?;
            Ok((host.to_string(), port))
        }
        None if !server.is_empty() => Ok((server.to_string(), DEFAULT_PORT)),
        _ => Err(bad("expected HOST:PORT")),
    }
}

/// What the client tells its owner (the daemon).
pub trait XmppEvents: Send + Sync {
    fn state(&self, state: XmppState);
    /// A trusted JID says it is `peer`, reachable at `addrs`. `own_account`: the
    /// JID is another resource of this device's account (else a peer's contact).
    fn announced(&self, from: &BareJid, own_account: bool, peer: PeerId, addrs: Vec<SocketAddr>);
    /// The device that announced itself as `peer` has `folder` up to `seq`.
    fn changed(&self, peer: PeerId, folder: &str, seq: u64);
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum XmppState {
    Connecting,
    Online,
    /// Lost the server; the client reconnects by itself.
    Reconnecting(String),
    /// Could not log in (a refused password, an unreachable server); tried
    /// again after a back-off.
    Failed(String),
    Stopped,
}

impl std::fmt::Display for XmppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XmppState::Connecting => write!(f, "connecting"),
            XmppState::Online => write!(f, "online"),
            XmppState::Reconnecting(reason) => write!(f, "reconnecting ({reason})"),
            XmppState::Failed(reason) => write!(f, "{reason}"),
            XmppState::Stopped => write!(f, "stopped"),
        }
    }
}

/// Everything a session needs to log in and to speak for this device.
#[derive(Clone)]
pub struct Settings {
    pub jid: BareJid,
    /// The resource: one per device, so the devices of one account do not
    /// replace each other's sessions.
    pub resource: String,
    pub password: String,
    pub server: Option<String>,
    pub peer: PeerId,
    pub addrs: Vec<SocketAddr>,
    /// The contacts (bare JIDs of other accounts) whose stanzas are trusted.
    pub contacts: Vec<BareJid>,
    /// How long to wait for the first login before reporting why it fails.
    pub login_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    // By hand: the password is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("jid", &self.jid)
            .field("resource", &self.resource)
            .field("server", &self.server)
            .field("peer", &self.peer)
            .field("addrs", &self.addrs)
            .field("contacts", &self.contacts)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Command {
    Changed {
        to: Vec<PeerId>,
        folder: String,
        seq: u64,
    },
    Contacts(Vec<BareJid>),
    Stop,
}

/// The running client: dropped or stopped, it says "unavailable" and logs out.
pub struct XmppClient {
    own: BareJid,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl XmppClient {
    /// Starts the client on a thread of its own; it logs in and keeps trying.
    pub fn start(settings: Settings, events: Arc<dyn XmppEvents>) -> Result<Self> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let own = settings.jid.clone();
        let thread = std::thread::Builder::new()
            .name("xmpp".into())
            .spawn(move || session::run(settings, events, receiver))
            .map_err(|e| Error::Xmpp(format!("cannot start the XMPP thread: {e}")))?;
        Ok(XmppClient {
            own,
            commands,
            thread: Some(thread),
        })
    }

    /// Tells the devices that announced themselves as `to` that this device's
    /// history of `folder` reaches `seq`.
    pub fn send_changed(&self, to: Vec<PeerId>, folder: &str, seq: u64) {
        let _ = self.commands.send(Command::Changed {
            to,
            folder: folder.to_string(),
            seq,
        });
    }

    /// The contacts whose stanzas are trusted, as the peer list now says.
    pub fn set_contacts(&self, mut contacts: Vec<BareJid>) {
        contacts.retain(|contact| *contact != self.own);
        let _ = self.commands.send(Command::Contacts(contacts));
    }

    /// Says "unavailable", logs out, and waits for the thread.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for XmppClient {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// `host-ABCDEFG`: the device's name and the start of its peer id, a resource
/// unique among the account's devices even when two have the same host name.
pub fn resource_for(name: &str, peer: &PeerId) -> String {
    let name: String = name
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    let name = if name.is_empty() {
        "latus".into()
    } else {
        name
    };
    format!("{name}-{}", peer.short())
}

/// Where the account's settings live (for messages).
pub fn config_path(home: &Home) -> PathBuf {
    home.config_dir.join(CONFIG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(dir: &Path) -> Home {
        Home {
            config_dir: dir.join("config"),
            data_dir: dir.join("data"),
        }
    }

    #[test]
    fn the_account_is_saved_and_the_password_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = home(dir.path());
        let config = XmppConfig {
            jid: "alice@example.org".into(),
            server: Some("127.0.0.1:5222".into()),
        };
        config.save(&home, Some("s3cret\n")).unwrap();
        assert_eq!(XmppConfig::load(&home).unwrap(), Some(config));
        let path = home.config_dir.join(PASSWORD_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret\n");
        assert!(XmppConfig::remove(&home).unwrap());
        assert_eq!(XmppConfig::load(&home).unwrap(), None);
    }

    #[test]
    fn bad_accounts_are_refused() {
        for (jid, server) in [
            ("example.org", None),
            ("a@b@c", None),
            ("alice@example.org", Some("host:port")),
            ("alice@example.org", Some(":5222")),
        ] {
            let config = XmppConfig {
                jid: jid.into(),
                server: server.map(Into::into),
            };
            assert!(config.check().is_err(), "{config:?} should be refused");
        }
    }

    #[test]
    fn servers_default_to_the_client_port() {
        assert_eq!(
            server_host_port("xmpp.example.org").unwrap(),
            ("xmpp.example.org".into(), DEFAULT_PORT)
        );
        assert_eq!(
            server_host_port("[::1]:15222").unwrap(),
            ("::1".into(), 15222)
        );
        assert_eq!(
            server_host_port("localhost:15222").unwrap(),
            ("localhost".into(), 15222)
        );
    }

    #[test]
    fn resources_are_unique_per_device_and_printable() {
        let a = resource_for("my laptop/ü", &PeerId([1; 32]));
        let b = resource_for("my laptop/ü", &PeerId([2; 32]));
        assert_ne!(a, b);
        assert!(a.starts_with("mylaptopü-"), "{a}");
    }
}
