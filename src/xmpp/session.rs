//! One XMPP session after another: log in, say "available", announce this device
//! to each trusted device that comes online, pass their announcements and
//! "changed" messages to the daemon, and come back after any failure.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sasl::common::{ChannelBinding, Credentials};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::connect::tls_common::TlsStream;
use tokio_xmpp::connect::{DnsConfig, ServerConnector, starttls::starttls};
use tokio_xmpp::error::ProtocolError;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::roster::Roster;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{Event, StanzaStream, StreamEvent};
use tokio_xmpp::xmlstream::{PendingFeaturesRecv, StreamHeader, Timeouts, initiate_stream};

use super::stanza::Payload;
use super::{Command, Settings, XmppEvents, XmppState, server_host_port};
use crate::device::PeerId;

const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Stanzas queued each way before the other side waits.
const QUEUE_DEPTH: usize = 64;

/// Connects like tokio-xmpp's STARTTLS connector, but with `TCP_NODELAY`: with
/// Nagle's algorithm on, each small stanza waits for the delayed ACK of the last
/// (~40 ms a hop). TLS is required: the password never travels in clear.
#[derive(Debug, Clone)]
pub struct Connector {
    dns: DnsConfig,
}

impl Connector {
    /// `server`: HOST:PORT; without it, the JID's domain through DNS SRV.
    pub fn new(jid: &BareJid, server: Option<&str>) -> crate::Result<Self> {
        let dns = match server {
            Some(server) => {
                let (host, port) = server_host_port(server)?;
                DnsConfig::NoSrv {
                    host,
                    port,
                    resolver: None,
                }
            }
            None => DnsConfig::srv_default_client(jid.domain().as_str()),
        };
        Ok(Connector { dns })
    }
}

impl ServerConnector for Connector {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), tokio_xmpp::Error> {
        let domain = jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(Cow::Borrowed(domain)),
            from: None,
            id: None,
        };
        let tcp = self.dns.resolve().await?;
        tcp.set_nodelay(true)?;
        let plain = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
        let (features, plain) = plain.recv_features().await?;
        if !features.can_starttls() {
            return Err(tokio_xmpp::Error::Protocol(ProtocolError::NoTls));
        }
        let (tls, binding) = starttls(plain, domain).await?;
        let stream = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        Ok((stream, binding))
    }
}

enum Ended {
    Stopped,
    /// Could not come online.
    Failed(String),
    /// Was online, then lost the server.
    Lost,
}

/// The XMPP thread: sessions until told to stop, each on a runtime of its own.
pub(super) fn run(
    settings: Settings,
    events: Arc<dyn XmppEvents>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut delay = FIRST_RETRY_DELAY;
    // Kept across sessions: the daemon updates it as the peer list changes.
    let mut contacts: HashSet<BareJid> = settings.contacts.iter().cloned().collect();
    loop {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                events.state(XmppState::Failed(format!("cannot start a runtime: {e}")));
                return;
            }
        };
        events.state(XmppState::Connecting);
        let ended = runtime.block_on(session(
            &settings,
            events.as_ref(),
            &mut commands,
            &mut contacts,
        ));
        // Dropping the runtime also ends tokio-xmpp's reconnection task, which
        // would otherwise retry a refused password forever.
        drop(runtime);
        match ended {
            Ended::Stopped => {
                events.state(XmppState::Stopped);
                return;
            }
            Ended::Failed(reason) => {
                tracing::warn!("xmpp: {reason}; trying again in {delay:?}");
                events.state(XmppState::Failed(reason));
            }
            Ended::Lost => {
                delay = FIRST_RETRY_DELAY;
                events.state(XmppState::Reconnecting("lost the server".into()));
            }
        }
        if wait_or_stop(delay, &mut commands, &mut contacts) {
            events.state(XmppState::Stopped);
            return;
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Waits `delay`; `true` if told to stop meanwhile.
fn wait_or_stop(
    delay: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    contacts: &mut HashSet<BareJid>,
) -> bool {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        std::thread::sleep(delay);
        return false;
    };
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            match tokio::time::timeout_at(deadline, commands.recv()).await {
                Err(_) => return false,
                Ok(command) => {
                    if offline(command, contacts) {
                        return true;
                    }
                }
            }
        }
    })
}

/// A command while not online; `true` for "stop". News is dropped: there is
/// no one to tell.
fn offline(command: Option<Command>, contacts: &mut HashSet<BareJid>) -> bool {
    match command {
        None | Some(Command::Stop) => true,
        Some(Command::Contacts(new)) => {
            *contacts = new.into_iter().collect();
            false
        }
        Some(Command::Changed { .. }) => false,
    }
}

async fn session(
    settings: &Settings,
    events: &dyn XmppEvents,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    contacts: &mut HashSet<BareJid>,
) -> Ended {
    let full = match settings.jid.with_resource_str(&settings.resource) {
        Ok(full) => full,
        Err(e) => return Ended::Failed(format!("bad resource {:?}: {e}", settings.resource)),
    };
    let connector = match Connector::new(&settings.jid, settings.server.as_deref()) {
        Ok(connector) => connector,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    // The stanza stream itself rather than tokio-xmpp's `Client`: the client
    // keeps a lost connection to itself (it never says "suspended").
    let mut client = StanzaStream::new_c2s(
        connector.clone(),
        full.into(),
        settings.password.clone(),
        Timeouts::tight(),
        QUEUE_DEPTH,
    );
    // tokio-xmpp retries a failed login without a word: wait a while for the
    // first connection, then find out why it does not come.
    let first = tokio::select! {
        first = tokio::time::timeout(settings.login_timeout, first_online(&mut client)) => first,
        _ = stop_requested(commands, contacts) => return Ended::Stopped,
    };
    let bound = match first {
        Ok(Some(bound)) => {
            tracing::info!("xmpp: online as {bound}");
            bound
        }
        Ok(None) => return Ended::Failed("the XMPP client stopped".into()),
        Err(_) => return Ended::Failed(diagnose(settings, &connector).await),
    };
    let mut state = State {
        settings,
        events,
        own: settings.jid.clone(),
        contacts,
        bound: bound.try_as_full().ok().cloned(),
        devices: HashMap::new(),
        announced_to: HashSet::new(),
    };
    events.state(XmppState::Online);
    state.came_online(&mut client).await;
    loop {
        tokio::select! {
            event = client.next() => match event {
                None => return Ended::Failed("the XMPP client stopped".into()),
                Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => {
                    tracing::info!("xmpp: online again as {bound_jid} (a new session)");
                    state.bound = bound_jid.try_as_full().ok().cloned();
                    events.state(XmppState::Online);
                    state.came_online(&mut client).await;
                }
                Some(Event::Stream(StreamEvent::Resumed)) => {
                    tracing::info!("xmpp: online again (the session resumed)");
                    events.state(XmppState::Online);
                }
                Some(Event::Stream(StreamEvent::Suspended)) => {
                    // A new session rather than tokio-xmpp's resumption: 6.0.0
                    // cannot parse the <failed/> (without 'h') that Prosody
                    // sends after a restart, and would retry it forever. Our
                    // stanzas are all worth resending anyway.
                    tracing::warn!("xmpp: lost the server; starting a new session");
                    return Ended::Lost;
                }
                Some(Event::Stanza(stanza)) => state.received(&mut client, stanza).await,
            },
            command = commands.recv() => match command {
                None | Some(Command::Stop) => {
                    send(&mut client, Presence::unavailable().into()).await;
                    // Closing flushes the queue (the "unavailable" above) first.
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
                    return Ended::Stopped;
                }
                Some(Command::Changed { to, folder, seq }) => {
                    state.send_changed(&mut client, &to, &folder, seq).await;
                }
                Some(Command::Contacts(contacts)) => state.set_contacts(&mut client, contacts).await,
            },
        }
    }
}

async fn first_online(client: &mut StanzaStream) -> Option<Jid> {
    while let Some(event) = client.next().await {
        if let Event::Stream(StreamEvent::Reset { bound_jid, .. }) = event {
            return Some(bound_jid);
        }
    }
    None
}

async fn stop_requested(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    contacts: &mut HashSet<BareJid>,
) {
    while !offline(commands.recv().await, contacts) {}
}

/// Logs in once more, by hand, to tell why the client does not come online.
async fn diagnose(settings: &Settings, connector: &Connector) -> String {
    let jid = Jid::from(settings.jid.clone());
    let attempt = async {
        let (stream, binding) = connector
            .connect(
                &jid,
                tokio_xmpp::parsers::ns::JABBER_CLIENT,
                Timeouts::tight(),
            )
            .await?;
        let (features, stream) = stream.recv_features().await?;
        let username = settings.jid.node().map_or("", |node| node.as_str());
        let credentials = Credentials::default()
            .with_username(username)
            .with_password(settings.password.clone())
            .with_channel_binding(binding);
        tokio_xmpp::client_login(stream, features.sasl_mechanisms, credentials).await?;
        Ok::<(), tokio_xmpp::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(15), attempt).await {
        Err(_) => "no answer from the XMPP server".into(),
        Ok(Err(tokio_xmpp::Error::Auth(_))) => "authentication failed".into(),
        Ok(Err(e)) => format!("cannot log in: {e}"),
        Ok(Ok(())) => "logged in, but the session did not start".into(),
    }
}

/// Queues a stanza. If the server is lost first, it goes with the session;
/// the next session announces this device again.
async fn send(client: &mut StanzaStream, stanza: Stanza) {
    client.send(Box::new(stanza)).await;
}

struct State<'a> {
    settings: &'a Settings,
    events: &'a dyn XmppEvents,
    own: BareJid,
    contacts: &'a mut HashSet<BareJid>,
    bound: Option<FullJid>,
    /// The trusted resources online, with the peer id each announced.
    devices: HashMap<FullJid, Option<PeerId>>,
    /// Who has our announcement since it came online.
    announced_to: HashSet<FullJid>,
}

impl State<'_> {
    /// A new session: nobody is known to be online until their presence comes.
    async fn came_online(&mut self, client: &mut StanzaStream) {
        self.devices.clear();
        self.announced_to.clear();
        // A negative priority: chat messages to the bare JID go to the user's
        // chat clients, never to a Latus resource.
        send(client, Presence::available().with_priority(-1).into()).await;
        for contact in self.contacts.iter() {
            // Asks to see the contact's presence (a no-op if already allowed).
            let subscribe = Presence::subscribe().with_to(Jid::from(contact.clone()));
            send(client, subscribe.into()).await;
        }
    }

    /// New contacts are asked for their presence; removed ones are no longer heard.
    async fn set_contacts(&mut self, client: &mut StanzaStream, contacts: Vec<BareJid>) {
        let contacts: HashSet<BareJid> = contacts.into_iter().collect();
        for added in contacts.difference(self.contacts) {
            let subscribe = Presence::subscribe().with_to(Jid::from(added.clone()));
            send(client, subscribe.into()).await;
        }
        self.devices.retain(|jid, _| {
            let bare = jid.to_bare();
            bare == self.own || contacts.contains(&bare)
        });
        *self.contacts = contacts;
    }

    /// The account itself, or a contact recorded for a known peer.
    fn trusted(&self, from: &FullJid) -> bool {
        let bare = from.to_bare();
        bare == self.own || self.contacts.contains(&bare)
    }

    async fn received(&mut self, client: &mut StanzaStream, stanza: Stanza) {
        match stanza {
            Stanza::Presence(presence) => self.presence(client, presence).await,
            Stanza::Message(message) => self.message(client, message).await,
            Stanza::Iq(iq) => self.iq(client, iq).await,
        }
    }

    /// Every request gets an answer, as XMPP wants: an empty result to the
    /// server's roster pushes, "service unavailable" to anything else.
    async fn iq(&mut self, client: &mut StanzaStream, iq: Iq) {
        let (from, id, payload) = match iq {
            Iq::Get {
                from, id, payload, ..
            }
            | Iq::Set {
                from, id, payload, ..
            } => (from, id, payload),
            Iq::Result { .. } | Iq::Error { .. } => return,
        };
        let from_server = from
            .as_ref()
            .is_none_or(|from| from.try_as_full().is_err() && from.to_bare() == self.own);
        let answer = if from_server && payload.is("query", ns::ROSTER) {
            Iq::from_result(id, None::<Roster>)
        } else {
            let error = StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "",
            );
            Iq::from_error(id, error)
        };
        let answer = match from {
            Some(from) => answer.with_to(from),
            None => answer,
        };
        send(client, answer.into()).await;
    }

    async fn presence(&mut self, client: &mut StanzaStream, presence: Presence) {
        let Some(from) = presence.from.as_ref().and_then(|j| j.try_as_full().ok()) else {
            // A bare `from`: a contact's subscription answers and the like.
            if let (PresenceType::Subscribe, Some(from)) = (&presence.type_, &presence.from) {
                self.subscription_request(client, from.to_bare()).await;
            }
            return;
        };
        if Some(from) == self.bound.as_ref() {
            return;
        }
        if !self.trusted(from) {
            tracing::debug!(
                "xmpp: ignored presence from {from}: not this account nor a peer's contact"
            );
            return;
        }
        match presence.type_ {
            PresenceType::None => {
                if !self.devices.contains_key(from) {
                    tracing::info!("xmpp: {from} is available");
                    self.devices.insert(from.clone(), None);
                }
                self.announce_to(client, from.clone()).await;
            }
            PresenceType::Unavailable => {
                tracing::info!("xmpp: {from} is unavailable");
                self.devices.remove(from);
                self.announced_to.remove(from);
            }
            PresenceType::Subscribe => self.subscription_request(client, from.to_bare()).await,
            _ => {}
        }
    }

    /// A peer's contact may see this device's presence; nobody else.
    async fn subscription_request(&mut self, client: &mut StanzaStream, from: BareJid) {
        if self.contacts.contains(&from) {
            let answer = Presence::subscribed().with_to(Jid::from(from));
            send(client, answer.into()).await;
        } else {
            tracing::info!(
                "xmpp: ignored a subscription request from {from}: not a peer's contact"
            );
        }
    }

    async fn message(&mut self, client: &mut StanzaStream, message: Message) {
        let Some(from) = message.from.as_ref() else {
            return;
        };
        for element in &message.payloads {
            let Some(payload) = Payload::from_element(element) else {
                continue;
            };
            let Some(from) = from.try_as_full().ok().filter(|from| self.trusted(from)) else {
                tracing::warn!(
                    "xmpp: ignored a stanza from {from}: not this account nor a peer's contact"
                );
                return;
            };
            let payload = match payload {
                Ok(payload) => payload,
                Err(reason) => {
                    tracing::warn!("xmpp: dropped a malformed stanza from {from}: {reason}");
                    continue;
                }
            };
            match payload {
                Payload::Announce { peer, addrs } => {
                    if peer == self.settings.peer {
                        tracing::warn!("xmpp: {from} announced this device's own peer id; ignored");
                        continue;
                    }
                    tracing::debug!("xmpp: {from} is peer {peer} at {addrs:?}");
                    self.devices.insert(from.clone(), Some(peer));
                    let bare = from.to_bare();
                    self.events.announced(&bare, bare == self.own, peer, addrs);
                    // It may have missed our presence: answer once.
                    self.announce_to(client, from.clone()).await;
                }
                Payload::Changed { folder, seq } => match self.devices.get(from) {
                    Some(Some(peer)) => self.events.changed(*peer, &folder, seq),
                    _ => tracing::debug!(
                        "xmpp: ignored 'changed' from {from}, which has not announced itself"
                    ),
                },
            }
        }
    }

    async fn announce_to(&mut self, client: &mut StanzaStream, to: FullJid) {
        if !self.announced_to.insert(to.clone()) {
            return;
        }
        let announce = Payload::Announce {
            peer: self.settings.peer,
            addrs: self.settings.addrs.clone(),
        };
        let message =
            Message::headline(Some(Jid::from(to))).with_payloads(vec![announce.to_element()]);
        send(client, message.into()).await;
    }

    async fn send_changed(
        &mut self,
        client: &mut StanzaStream,
        to: &[PeerId],
        folder: &str,
        seq: u64,
    ) {
        let payload = Payload::Changed {
            folder: folder.to_string(),
            seq,
        };
        let targets: Vec<FullJid> = self
            .devices
            .iter()
            .filter(|(_, peer)| peer.is_some_and(|peer| to.contains(&peer)))
            .map(|(jid, _)| jid.clone())
            .collect();
        for jid in targets {
            let message =
                Message::headline(Some(Jid::from(jid))).with_payloads(vec![payload.to_element()]);
            send(client, message.into()).await;
        }
    }
}
