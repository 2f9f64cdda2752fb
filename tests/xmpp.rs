//! Devices that find each other through a real XMPP server (Prosody on
//! 127.0.0.1): real `latus serve` processes with no address of each other, only
//! the same XMPP account. Every wait is bounded.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::prosody::{DOMAIN, Prosody};
use common::write;
use latus::device::PeerId;
use latus::xmpp::stanza::Payload;
use latus::xmpp::{Settings, XmppClient, XmppEvents, XmppState};
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::message::Message;

const LATUS: &str = env!("CARGO_BIN_EXE_latus");
const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "correct horse";

struct Device {
    home: PathBuf,
    folder: PathBuf,
    server: String,
    cert: PathBuf,
    daemon: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Device {
    /// A device logging in as `user@localhost` with `password`.
    fn new(prosody: &Prosody, user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (home, folder) = (dir.path().join("home"), dir.path().join("folder"));
        fs::create_dir_all(&folder).unwrap();
        let device = Device {
            home,
            folder,
            server: prosody.addr(),
            cert: prosody.cert(),
            daemon: None,
            _dir: dir,
        };
        device.ok(&["init"]);
        device.ok(&["folder", "add", "docs", device.folder.to_str().unwrap()]);
        let password_file = device.home.join("password.txt");
        fs::write(&password_file, format!("{password}\n")).unwrap();
        let jid = format!("{user}@{DOMAIN}");
        device.ok(&[
            "xmpp",
            "set",
            &jid,
            "--password-file",
            password_file.to_str().unwrap(),
            "--server",
            &device.server,
        ]);
        device
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(LATUS)
            .env("LATUS_HOME", &self.home)
            .env_remove("LATUS_LOG")
            .env_remove("LATUS_XMPP_PASSWORD")
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn id(&self) -> String {
        self.ok(&["id"]).trim().to_string()
    }

    /// Knows `other` by its id only (no address) and shares the folder with it.
    fn trust(&self, other: &Device) {
        let id = other.id();
        self.ok(&["peer", "add", &id]);
        self.ok(&["folder", "share", "docs", &id]);
    }

    fn start(&mut self) {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.home.join("serve.log"))
            .unwrap();
        let _ = fs::remove_file(self.home.join(latus::daemon::ADDR_FILE));
        let child = Command::new(LATUS)
            .env("LATUS_HOME", &self.home)
            .env("SSL_CERT_FILE", &self.cert)
            .env_remove("LATUS_XMPP_PASSWORD")
            .args([
                "--log-level",
                "info",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--watch-delay",
                "0.2",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let addr_file = self.home.join(latus::daemon::ADDR_FILE);
        wait_for("the daemon to listen", || addr_file.exists());
    }

    /// SIGTERM, as a user stopping the service: it says "unavailable".
    fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: kill(2) on the pid of a child we have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > WAIT {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.home.join("serve.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    fn xmpp_state(&self) -> String {
        self.status()["status"]["xmpp"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The full JID the daemon logged in as (from its log).
    fn full_jid(&self) -> FullJid {
        let mut jid = None;
        wait_for("the daemon to be online", || {
            jid = self
                .log()
                .lines()
                .find_map(|line| line.split("xmpp: online as ").nth(1).map(str::to_string));
            jid.is_some()
        });
        jid.unwrap().trim().parse().unwrap()
    }

    fn has(&self, rel: &str, content: &[u8]) -> bool {
        fs::read(self.folder.join(rel)).is_ok_and(|c| c == content)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn wait_for_file(devices: &[&Device], rel: &str, content: &[u8]) {
    let start = Instant::now();
    while !devices.iter().all(|d| d.has(rel, content)) {
        if start.elapsed() > WAIT {
            let logs: Vec<String> = devices.iter().map(|d| d.log()).collect();
            panic!(
                "{rel} did not reach every device; logs:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn server() -> Prosody {
    let prosody = Prosody::start();
    prosody.register("alice", PASSWORD);
    prosody
}

#[test]
fn two_daemons_with_only_an_xmpp_account_find_each_other_and_sync() {
    let prosody = server();
    let (mut a, mut b) = (
        Device::new(&prosody, "alice", PASSWORD),
        Device::new(&prosody, "alice", PASSWORD),
    );
    a.trust(&b);
    b.trust(&a);
    write(&a.folder, "from-a.txt", b"written on a");
    let started = Instant::now();
    a.start();
    b.start();
    wait_for_file(&[&b], "from-a.txt", b"written on a");
    eprintln!(
        "from `latus serve` to the first file synced through XMPP discovery: {:?}",
        started.elapsed()
    );
    write(&b.folder, "from-b.txt", b"written on b");
    wait_for_file(&[&a], "from-b.txt", b"written on b");

    // B goes offline; A changes meanwhile; B comes back on another port and
    // the two find each other again.
    b.stop();
    wait_for("A to see B gone", || a.log().contains("is unavailable"));
    write(&a.folder, "while-away.txt", b"b was away");
    b.start();
    wait_for_file(&[&b], "while-away.txt", b"b was away");
    write(&b.folder, "back.txt", b"b is back");
    wait_for_file(&[&a], "back.txt", b"b is back");
    assert_eq!(a.xmpp_state(), "online");
}

#[test]
fn three_daemons_on_one_account_converge() {
    let prosody = server();
    let mut devices: Vec<Device> = (0..3)
        .map(|_| Device::new(&prosody, "alice", PASSWORD))
        .collect();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                devices[i].trust(&devices[j]);
            }
        }
    }
    for (i, device) in devices.iter_mut().enumerate() {
        write(
            &device.folder,
            &format!("{i}.txt"),
            format!("device {i}").as_bytes(),
        );
        device.start();
    }
    let all: Vec<&Device> = devices.iter().collect();
    for i in 0..3 {
        wait_for_file(&all, &format!("{i}.txt"), format!("device {i}").as_bytes());
    }
}

#[test]
fn syncing_goes_on_while_the_xmpp_server_restarts_and_presence_comes_back() {
    let mut prosody = server();
    let (mut a, mut b) = (
        Device::new(&prosody, "alice", PASSWORD),
        Device::new(&prosody, "alice", PASSWORD),
    );
    a.trust(&b);
    b.trust(&a);
    a.start();
    b.start();
    write(&a.folder, "one.txt", b"1");
    wait_for_file(&[&b], "one.txt", b"1");

    prosody.stop();
    wait_for("A to notice the server is gone", || {
        a.xmpp_state() != "online"
    });
    // The data plane does not need the XMPP server.
    write(&a.folder, "two.txt", b"2");
    wait_for_file(&[&b], "two.txt", b"2");

    let seen_before = b.log().matches("is available").count();
    prosody.restart();
    wait_for("both to be online again", || {
        a.xmpp_state() == "online" && b.xmpp_state() == "online"
    });
    wait_for("B to see A's presence again", || {
        b.log().matches("is available").count() > seen_before
    });
    write(&b.folder, "three.txt", b"3");
    wait_for_file(&[&a], "three.txt", b"3");
}

#[test]
fn a_refused_password_is_reported_and_syncing_goes_on_over_known_addresses() {
    let prosody = server();
    let (mut a, mut b) = (
        Device::new(&prosody, "alice", "wrong password"),
        Device::new(&prosody, "alice", PASSWORD),
    );
    a.trust(&b);
    a.start();
    let addr = fs::read_to_string(a.home.join(latus::daemon::ADDR_FILE)).unwrap();
    b.ok(&["peer", "add", &a.id(), "--addr", addr.trim()]);
    b.ok(&["folder", "share", "docs", &a.id()]);
    b.start();
    write(&a.folder, "x.txt", b"x");
    wait_for_file(&[&b], "x.txt", b"x");
    wait_for("A to report the refused password", || {
        a.xmpp_state() == "authentication failed"
    });
    let status = a.ok(&["status"]);
    assert!(
        status.contains("xmpp: authentication failed as alice@localhost"),
        "{status}"
    );
    assert!(
        !a.log().contains("wrong password"),
        "the password was logged"
    );
}

/// A client of the test's own on the XMPP server, to send what a real device
/// never would.
struct RawClient {
    runtime: tokio::runtime::Runtime,
    client: tokio_xmpp::Client,
}

impl RawClient {
    fn login(prosody: &Prosody, jid: &str, password: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let full: FullJid = jid.parse().unwrap();
        let addr = prosody.addr();
        let client = runtime.block_on(async {
            let connector = latus::xmpp::Connector::new(&full.to_bare(), Some(&addr)).unwrap();
            let mut client = tokio_xmpp::Client::new_with_connector(
                full,
                password.to_string(),
                connector,
                tokio_xmpp::xmlstream::Timeouts::tight(),
            );
            use futures::StreamExt;
            tokio::time::timeout(WAIT, async {
                while let Some(event) = client.next().await {
                    if event.is_online() {
                        return;
                    }
                }
            })
            .await
            .expect("the raw client logs in");
            client
        });
        RawClient { runtime, client }
    }

    fn send(&mut self, to: &FullJid, payload: &Payload) {
        let message = Message::headline(Some(Jid::from(to.clone())))
            .with_payloads(vec![payload.to_element()]);
        let client = &mut self.client;
        self.runtime
            .block_on(client.send_stanza(message.into()))
            .unwrap();
    }
}

#[test]
fn stanzas_from_strangers_or_with_a_wrong_peer_id_lead_to_no_trust() {
    let prosody = server();
    prosody.register("mallory", "mallory's");
    let (mut a, b) = (
        Device::new(&prosody, "alice", PASSWORD),
        Device::new(&prosody, "alice", PASSWORD),
    );
    a.trust(&b);
    // E: a daemon A does not know, with a file A must never get.
    let mut e = Device::new(&prosody, "mallory", "mallory's");
    e.trust(&a);
    write(&e.folder, "secret.txt", b"from e");
    a.start();
    e.start();
    let a_jid = a.full_jid();
    let b_id: PeerId = b.id().parse().unwrap();

    // Another account announces B's id at an address of its own: ignored.
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let mut mallory = RawClient::login(&prosody, "mallory@localhost/x", "mallory's");
    mallory.send(
        &a_jid,
        &Payload::Announce {
            peer: b_id,
            addrs: vec![trap.local_addr().unwrap()],
        },
    );
    wait_for("A to ignore mallory", || {
        a.log()
            .contains("ignored a stanza from mallory@localhost/x")
    });

    // A resource of A's own account says B listens where E does: A dials, and
    // TLS refuses E, whose certificate is not B's.
    let e_addr = fs::read_to_string(e.home.join(latus::daemon::ADDR_FILE)).unwrap();
    let mut intruder = RawClient::login(&prosody, "alice@localhost/intruder", PASSWORD);
    intruder.send(
        &a_jid,
        &Payload::Announce {
            peer: b_id,
            addrs: vec![e_addr.trim().parse().unwrap()],
        },
    );
    let refused = format!("{}: TLS handshake with peer {b_id} failed", e_addr.trim());
    wait_for("A to refuse E", || a.log().contains(&refused));
    // Malformed payloads from a trusted resource are dropped, not obeyed.
    let garbage = format!(
        "<announce xmlns='{}' peer='nonsense'><addr>127.0.0.1:1</addr></announce>",
        latus::xmpp::stanza::NS
    );
    let message = Message::headline(Some(Jid::from(a_jid.clone())))
        .with_payloads(vec![garbage.parse().unwrap()]);
    intruder
        .runtime
        .block_on(intruder.client.send_stanza(message.into()))
        .unwrap();
    wait_for("A to drop the malformed stanza", || {
        a.log()
            .contains("dropped a malformed stanza from alice@localhost/intruder")
    });

    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "A dialled the address a stranger announced"
    );
    assert!(!a.folder.join("secret.txt").exists());
    let peers = a.status()["status"]["peers"].clone();
    assert_eq!(peers[0]["connected"], false, "{peers}");
    assert!(a.log().contains("is not a known peer") || !a.log().contains("panicked"));
}

/// Forwards what a client hears to the test thread.
struct Heard {
    announced: Mutex<mpsc::Sender<PeerId>>,
    changed: Mutex<mpsc::Sender<u64>>,
}

impl XmppEvents for Heard {
    fn state(&self, _state: XmppState) {}
    fn announced(
        &self,
        _from: &BareJid,
        _own: bool,
        peer: PeerId,
        _addrs: Vec<std::net::SocketAddr>,
    ) {
        let _ = self.announced.lock().unwrap().send(peer);
    }
    fn changed(&self, _peer: PeerId, _folder: &str, seq: u64) {
        let _ = self.changed.lock().unwrap().send(seq);
    }
}

fn client(
    prosody: &Prosody,
    peer: PeerId,
) -> (XmppClient, mpsc::Receiver<PeerId>, mpsc::Receiver<u64>) {
    let (announced, heard_announced) = mpsc::channel();
    let (changed, heard_changed) = mpsc::channel();
    let settings = Settings {
        jid: BareJid::new("alice@localhost").unwrap(),
        resource: latus::xmpp::resource_for("test", &peer),
        password: PASSWORD.into(),
        server: Some(prosody.addr()),
        peer,
        addrs: vec!["127.0.0.1:9".parse().unwrap()],
        contacts: vec![],
        login_timeout: WAIT,
    };
    let events = Arc::new(Heard {
        announced: Mutex::new(announced),
        changed: Mutex::new(changed),
    });
    (
        XmppClient::start(settings, events).unwrap(),
        heard_announced,
        heard_changed,
    )
}

/// Thousands of stanzas both ways, each answered before the next: the client
/// must not stall (tokio-xmpp's receiver can lose a wake-up on a multi-threaded
/// runtime, hence its thread of its own).
#[test]
fn thousands_of_stanzas_cross_both_ways_in_order() {
    const ROUND_TRIPS: u64 = 2000;
    let prosody = server();
    let (p, q) = (PeerId([1; 32]), PeerId([2; 32]));
    let (client_p, announced_p, changed_p) = client(&prosody, p);
    let (client_q, announced_q, changed_q) = client(&prosody, q);
    assert_eq!(announced_p.recv_timeout(WAIT), Ok(q));
    assert_eq!(announced_q.recv_timeout(WAIT), Ok(p));
    let started = Instant::now();
    for seq in 0..ROUND_TRIPS {
        client_p.send_changed(vec![q], "docs", seq);
        assert_eq!(changed_q.recv_timeout(WAIT), Ok(seq), "Q's stanza {seq}");
        client_q.send_changed(vec![p], "docs", seq);
        assert_eq!(changed_p.recv_timeout(WAIT), Ok(seq), "P's stanza {seq}");
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{ROUND_TRIPS} round trips in {elapsed:?}: {:.0} per second",
        ROUND_TRIPS as f64 / elapsed.as_secs_f64()
    );
    client_p.stop();
    client_q.stop();
}
