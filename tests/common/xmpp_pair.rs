//! Two Latus XMPP clients on one account, each told of the other by its
//! announcement, answering each other's "changed" messages in turn: the
//! stanza round trip of the XMPP test and of `cargo bench --bench xmpp`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use latus::device::PeerId;
use latus::xmpp::{Settings, XmppClient, XmppEvents, XmppState};
use tokio_xmpp::jid::BareJid;

use super::prosody::{DOMAIN, Prosody};

const WAIT: Duration = Duration::from_secs(60);

/// Forwards what a client hears to the thread driving the exchange.
struct Heard {
    announced: Mutex<mpsc::Sender<PeerId>>,
    changed: Mutex<mpsc::Sender<u64>>,
}

impl XmppEvents for Heard {
    fn state(&self, _state: XmppState) {}
    fn announced(&self, _from: &BareJid, _own: bool, peer: PeerId, _addrs: Vec<SocketAddr>) {
        let _ = self.announced.lock().unwrap().send(peer);
    }
    fn changed(&self, _peer: PeerId, _folder: &str, seq: u64) {
        let _ = self.changed.lock().unwrap().send(seq);
    }
}

struct Side {
    peer: PeerId,
    client: XmppClient,
    announced: mpsc::Receiver<PeerId>,
    changed: mpsc::Receiver<u64>,
}

fn side(prosody: &Prosody, user: &str, password: &str, peer: PeerId) -> Side {
    let (announced, heard_announced) = mpsc::channel();
    let (changed, heard_changed) = mpsc::channel();
    let settings = Settings {
        jid: BareJid::new(&format!("{user}@{}", DOMAIN)).unwrap(),
        resource: latus::xmpp::resource_for("test", &peer),
        password: password.into(),
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
    Side {
        peer,
        client: XmppClient::start(settings, events).unwrap(),
        announced: heard_announced,
        changed: heard_changed,
    }
}

pub struct Pair {
    p: Side,
    q: Side,
}

impl Pair {
    /// Both clients online, each having heard the other's announcement.
    pub fn online(prosody: &Prosody, user: &str, password: &str) -> Self {
        let p = side(prosody, user, password, PeerId([1; 32]));
        let q = side(prosody, user, password, PeerId([2; 32]));
        assert_eq!(p.announced.recv_timeout(WAIT), Ok(q.peer));
        assert_eq!(q.announced.recv_timeout(WAIT), Ok(p.peer));
        Pair { p, q }
    }

    /// `count` round trips, each stanza checked to arrive, in order, before the
    /// next is sent; returns the time they took.
    pub fn round_trips(&self, count: u64) -> Duration {
        let started = Instant::now();
        for seq in 0..count {
            self.p.client.send_changed(vec![self.q.peer], "docs", seq);
            assert_eq!(
                self.q.changed.recv_timeout(WAIT),
                Ok(seq),
                "Q's stanza {seq}"
            );
            self.q.client.send_changed(vec![self.p.peer], "docs", seq);
            assert_eq!(
                self.p.changed.recv_timeout(WAIT),
                Ok(seq),
                "P's stanza {seq}"
            );
        }
        started.elapsed()
    }
}
