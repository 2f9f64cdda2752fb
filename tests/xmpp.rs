//! Devices that find each other through a real XMPP server (Prosody on
//! 127.0.0.1): real `latus serve` processes with no address of each other, only
//! the same XMPP account. Every wait is bounded.

mod common;

use std::fs;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::daemon::{Device, WAIT, wait_for};
use common::prosody::{DOMAIN, Prosody};
use common::write;
use common::xmpp_pair::Pair;
use latus::device::PeerId;
use latus::xmpp::stanza::Payload;
use tokio_xmpp::jid::{FullJid, Jid};
use tokio_xmpp::parsers::message::Message;

const PASSWORD: &str = "correct horse";

/// A device logging in as `user@localhost` with `password`.
fn device(prosody: &Prosody, user: &str, password: &str) -> Device {
    let mut device = Device::new();
    device.daemon_env("SSL_CERT_FILE", prosody.cert());
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
        &prosody.addr(),
    ]);
    device
}

fn xmpp_state(device: &Device) -> String {
    device.status()["status"]["xmpp"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The full JID the daemon logged in as (from its log).
fn full_jid(device: &Device) -> FullJid {
    let mut jid = None;
    wait_for("the daemon to be online", || {
        jid = device
            .log()
            .lines()
            .find_map(|line| line.split("xmpp: online as ").nth(1).map(str::to_string));
        jid.is_some()
    });
    jid.unwrap().trim().parse().unwrap()
}

fn has(device: &Device, rel: &str, content: &[u8]) -> bool {
    fs::read(device.folder.join(rel)).is_ok_and(|c| c == content)
}

fn wait_for_file(devices: &[&Device], rel: &str, content: &[u8]) {
    let start = Instant::now();
    while !devices.iter().all(|d| has(d, rel, content)) {
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
        device(&prosody, "alice", PASSWORD),
        device(&prosody, "alice", PASSWORD),
    );
    a.trust(&b, None);
    b.trust(&a, None);
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
    assert_eq!(xmpp_state(&a), "online");
}

#[test]
fn three_daemons_on_one_account_converge() {
    let prosody = server();
    let mut devices: Vec<Device> = (0..3)
        .map(|_| device(&prosody, "alice", PASSWORD))
        .collect();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                devices[i].trust(&devices[j], None);
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

/// A folder shared with another person: each device knows the other's owner
/// as a contact (`peer add --jid`, here added to B while it runs); they
/// subscribe to each other's presence.
#[test]
fn devices_of_two_accounts_that_are_each_others_contacts_sync() {
    let prosody = server();
    prosody.register("bob", "bob's");
    let (mut a, mut b) = (
        device(&prosody, "alice", PASSWORD),
        device(&prosody, "bob", "bob's"),
    );
    a.ok(&["peer", "add", &b.id(), "--jid", "bob@localhost"]);
    a.ok(&["folder", "share", "docs", &b.id()]);
    b.trust(&a, None);
    write(&a.folder, "for-bob.txt", b"hi bob");
    a.start();
    b.start();
    // Until B records A's owner as a contact, alice's stanzas are not heard.
    wait_for("B to ignore alice", || {
        b.log()
            .contains("ignored a subscription request from alice@localhost")
    });
    assert!(!b.folder.join("for-bob.txt").exists());
    b.ok(&["peer", "add", &a.id(), "--jid", "Alice@LOCALHOST"]);
    wait_for_file(&[&b], "for-bob.txt", b"hi bob");
    write(&b.folder, "for-alice.txt", b"hi alice");
    wait_for_file(&[&a], "for-alice.txt", b"hi alice");
}

#[test]
fn syncing_goes_on_while_the_xmpp_server_restarts_and_presence_comes_back() {
    let mut prosody = server();
    let (mut a, mut b) = (
        device(&prosody, "alice", PASSWORD),
        device(&prosody, "alice", PASSWORD),
    );
    a.trust(&b, None);
    b.trust(&a, None);
    a.start();
    b.start();
    write(&a.folder, "one.txt", b"1");
    wait_for_file(&[&b], "one.txt", b"1");

    prosody.stop();
    wait_for("A to notice the server is gone", || {
        xmpp_state(&a) != "online"
    });
    // The data plane does not need the XMPP server.
    write(&a.folder, "two.txt", b"2");
    wait_for_file(&[&b], "two.txt", b"2");

    let seen_before = b.log().matches("is available").count();
    prosody.restart();
    wait_for("both to be online again", || {
        xmpp_state(&a) == "online" && xmpp_state(&b) == "online"
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
        device(&prosody, "alice", "wrong password"),
        device(&prosody, "alice", PASSWORD),
    );
    a.trust(&b, None);
    a.start();
    let addr = fs::read_to_string(a.home.join(latus::daemon::ADDR_FILE)).unwrap();
    b.trust(&a, Some(addr.trim()));
    b.start();
    write(&a.folder, "x.txt", b"x");
    wait_for_file(&[&b], "x.txt", b"x");
    wait_for("A to report the refused password", || {
        xmpp_state(&a) == "authentication failed"
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
        device(&prosody, "alice", PASSWORD),
        device(&prosody, "alice", PASSWORD),
    );
    a.trust(&b, None);
    // E: a daemon A does not know, with a file A must never get.
    let mut e = device(&prosody, "mallory", "mallory's");
    e.trust(&a, None);
    write(&e.folder, "secret.txt", b"from e");
    a.start();
    e.start();
    let a_jid = full_jid(&a);
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

/// Thousands of stanzas both ways, each answered before the next: the client
/// must not stall (tokio-xmpp's receiver can lose a wake-up on a multi-threaded
/// runtime, hence its thread of its own). Timed by `cargo bench --bench xmpp`.
#[test]
fn thousands_of_stanzas_cross_both_ways_in_order() {
    let prosody = server();
    Pair::online(&prosody, "alice", PASSWORD).round_trips(2000);
}

/// Over XMPP a device learns that another is ahead even when it cannot reach
/// it: here B's only announced address is closed.
#[test]
fn a_device_learns_it_is_behind_from_one_it_cannot_reach() {
    let prosody = server();
    let (mut a, b) = (
        device(&prosody, "alice", PASSWORD),
        device(&prosody, "alice", PASSWORD),
    );
    a.trust(&b, None);
    a.ok(&["peer", "add", &b.id(), "--name", "bee"]);
    a.start();
    let a_jid = full_jid(&a);
    let b_id: PeerId = b.id().parse().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut b_on_xmpp = RawClient::login(&prosody, "alice@localhost/bee", PASSWORD);
    b_on_xmpp.send(
        &a_jid,
        &Payload::Announce {
            peer: b_id,
            addrs: vec![closed],
        },
    );
    b_on_xmpp.send(
        &a_jid,
        &Payload::Changed {
            folder: "docs".into(),
            seq: 42,
        },
    );
    wait_for("A to record B's news", || {
        a.status()["status"]["folders"][0]["announced"]["bee"] == 42
    });
    // The log is written by its own thread: it may lag the status.
    wait_for("A to log that B is not connected", || {
        a.log()
            .contains("has folder docs up to 42, but is not connected")
    });
    // News of a folder not shared with B is not taken.
    b_on_xmpp.send(
        &a_jid,
        &Payload::Changed {
            folder: "other".into(),
            seq: 7,
        },
    );
    wait_for("A to refuse news of another folder", || {
        a.log()
            .contains("sent news of folder \"other\", not shared with it")
    });
}
