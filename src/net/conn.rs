//! One authenticated connection to a peer: the hello exchange, then frames both
//! ways. Requests from this side wait for their response by id (many in flight,
//! answered in any order); requests from the peer are answered by a
//! [`RequestHandler`] on a blocking thread, since answering reads the disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::net::pace::Pace;
use crate::net::protocol::{self, Message, Request, Response, VERSION};

/// How long a request waits for its response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes buffered on each side of a connection's stream.
const IO_BUFFER: usize = 64 << 10;
/// Queued frames written before a flush at most: frames go out in batches, but
/// the first of a batch does not wait long for the last.
const FRAMES_PER_FLUSH: usize = 64;
/// How long the peer has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers the peer's requests (on a blocking thread).
pub trait RequestHandler: Send + Sync + 'static {
    fn answer(&self, peer: &PeerId, request: Request) -> Response;
    /// The peer's history of `folder` now ends at `seq`.
    fn changed(&self, peer: &PeerId, folder: &str, seq: u64);
}

pub struct Connection {
    pub peer: PeerId,
    pub name: String,
    /// The folders the peer shares with this device, with its replica id of each.
    pub folders: HashMap<String, PeerId>,
    outgoing: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    close_requested: Notify,
    /// Where news waits for room in a full outgoing queue.
    runtime: tokio::runtime::Handle,
    /// How fast the peer answers chunk requests, and what it still owes.
    pub pace: Arc<Pace>,
}

impl Connection {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Ends the connection (the peer may dial again and say hello anew).
    pub fn close(&self) {
        self.close_requested.notify_one();
    }

    pub async fn request(&self, request: Request) -> Result<Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let gone = || Error::Peer(format!("the connection to {} closed", self.name));
        {
            // Checked under the lock that `run` takes to fail the waiting
            // requests, after it marks the connection closed: a request made
            // after that would otherwise wait for its timeout.
            let mut pending = self.pending_map();
            if self.is_closed() {
                return Err(gone());
            }
            pending.insert(id, tx);
        }
        // A request given up on (timed out, or dropped for another peer's
        // answer) is forgotten: its late answer is then ignored.
        let _forget = Forget(self, id);
        if self
            .outgoing
            .send(Message::Request { id, request })
            .await
            .is_err()
        {
            return Err(gone());
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(Error::Peer(format!("{} did not answer in time", self.name))),
        }
    }

    /// Tells the peer that this device's history of `folder` ends at `seq`.
    /// Never dropped, since the peer may hear of no later change for an hour:
    /// when the outgoing queue is full, the news waits for room on the runtime,
    /// not on the caller (a scan or a round).
    pub fn notify_changed(&self, folder: &str, seq: u64) {
        let news = Message::Changed {
            folder: folder.to_string(),
            seq,
        };
        if let Err(mpsc::error::TrySendError::Full(news)) = self.outgoing.try_send(news) {
            let outgoing = self.outgoing.clone();
            self.runtime.spawn(async move {
                let _ = outgoing.send(news).await;
            });
        }
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Response>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a request from those waiting for an answer.
struct Forget<'c>(&'c Connection, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending_map().remove(&self.1);
    }
}

/// Says hello on `stream`, reads the peer's, and serves the connection until it
/// closes. `up` receives the connection once both hellos are through.
pub async fn run<S>(
    stream: S,
    peer: PeerId,
    hello: Message,
    handler: Arc<dyn RequestHandler>,
    up: impl FnOnce(Arc<Connection>),
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    // Buffered both ways: a frame's length and body are one read and one write,
    // and frames queued together leave together.
    let mut reader = BufReader::with_capacity(IO_BUFFER, reader);
    let mut writer = BufWriter::with_capacity(IO_BUFFER, writer);
    protocol::write_frame(&mut writer, &hello).await?;
    let theirs = tokio::time::timeout(HELLO_TIMEOUT, protocol::read_frame(&mut reader))
        .await
        .map_err(|_| Error::Protocol("no hello in time".into()))??;
    let (name, folders) = match theirs {
        Some(Message::Hello {
            version,
            name,
            folders,
        }) if version == VERSION => (name, folders),
        Some(Message::Hello { version, .. }) => {
            return Err(Error::Protocol(format!(
                "protocol version {version}; this device speaks {VERSION}"
            )));
        }
        _ => return Err(Error::Protocol("the first frame was not a hello".into())),
    };
    let (outgoing, mut to_send) = mpsc::channel::<Message>(256);
    let connection = Arc::new(Connection {
        peer,
        name,
        folders: folders
            .into_iter()
            .map(|(folder, replica)| (folder, PeerId(replica)))
            .collect(),
        outgoing: outgoing.clone(),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        pace: Arc::default(),
        closed: AtomicBool::new(false),
        close_requested: Notify::new(),
        runtime: tokio::runtime::Handle::current(),
    });
    up(Arc::clone(&connection));

    let peer_name = connection.name.clone();
    let sender = tokio::spawn(async move {
        while let Some(first) = to_send.recv().await {
            let mut message = Some(first);
            let mut written = 0;
            while let Some(next) = message.take() {
                if let Err(e) = protocol::write_frame_unflushed(&mut writer, &next).await {
                    tracing::warn!("{peer_name}: {e}");
                    return;
                }
                tracing::trace!("sent {}", describe(&next));
                written += 1;
                if written < FRAMES_PER_FLUSH {
                    message = to_send.try_recv().ok();
                }
            }
            if let Err(e) = writer.flush().await {
                tracing::warn!("{peer_name}: cannot send: {e}");
                return;
            }
        }
    });
    let result = tokio::select! {
        result = receive(&mut reader, &connection, &outgoing, handler) => result,
        () = connection.close_requested.notified() => Ok(()),
    };
    connection.closed.store(true, Ordering::Relaxed);
    // Requests still waiting learn that the connection is gone.
    connection.pending_map().clear();
    sender.abort();
    result
}

async fn receive<R: AsyncRead + Unpin>(
    reader: &mut R,
    connection: &Arc<Connection>,
    outgoing: &mpsc::Sender<Message>,
    handler: Arc<dyn RequestHandler>,
) -> Result<()> {
    while let Some(message) = protocol::read_frame(reader).await? {
        tracing::trace!("received {}", describe(&message));
        match message {
            Message::Request { id, request } => {
                let (handler, outgoing, peer) =
                    (Arc::clone(&handler), outgoing.clone(), connection.peer);
                tokio::spawn(async move {
                    let response =
                        tokio::task::spawn_blocking(move || handler.answer(&peer, request))
                            .await
                            .unwrap_or_else(|_| Response::Refused("internal error".into()));
                    let _ = outgoing.send(Message::Response { id, response }).await;
                });
            }
            Message::Response { id, response } => {
                if let Some(waiting) = connection.pending_map().remove(&id) {
                    let _ = waiting.send(response);
                }
            }
            Message::Changed { folder, seq } => {
                let (handler, peer) = (Arc::clone(&handler), connection.peer);
                tokio::task::spawn_blocking(move || handler.changed(&peer, &folder, seq));
            }
            Message::Hello { .. } => {
                return Err(Error::Protocol("a second hello".into()));
            }
        }
    }
    Ok(())
}

fn describe(message: &Message) -> String {
    match message {
        Message::Hello { .. } => "hello".into(),
        Message::Request { id, .. } => format!("request {id}"),
        Message::Response { id, .. } => format!("response {id}"),
        Message::Changed { folder, seq } => format!("changed {folder} {seq}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose frames go to `outgoing`, and the runtime it spawns on.
    fn connection(
        outgoing: mpsc::Sender<Message>,
        closed: bool,
    ) -> (tokio::runtime::Runtime, Connection) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let connection = Connection {
            peer: PeerId([1; 32]),
            name: "peer".into(),
            folders: HashMap::new(),
            outgoing,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            pace: Arc::default(),
            closed: AtomicBool::new(closed),
            close_requested: Notify::new(),
            runtime: runtime.handle().clone(),
        };
        (runtime, connection)
    }

    #[test]
    fn news_waits_for_room_when_the_outgoing_queue_is_full() {
        let (outgoing, mut queue) = mpsc::channel(1);
        let (runtime, connection) = connection(outgoing, false);
        connection.notify_changed("docs", 1);
        connection.notify_changed("docs", 2);
        let seqs = runtime.block_on(async {
            let mut seqs = Vec::new();
            while let Ok(Some(news)) =
                tokio::time::timeout(Duration::from_secs(5), queue.recv()).await
            {
                if let Message::Changed { seq, .. } = news {
                    seqs.push(seq);
                }
                if seqs.len() == 2 {
                    break;
                }
            }
            seqs
        });
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn a_request_on_a_closed_connection_fails_at_once() {
        // The queue still takes frames: its sender task may not be gone yet.
        let (outgoing, _queue) = mpsc::channel(8);
        let (runtime, connection) = connection(outgoing, true);
        let request = Request::ChunksOf {
            folder: "docs".into(),
            content: [0; 32],
        };
        let answer = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), connection.request(request)).await
        });
        match answer {
            Ok(Err(e)) => assert!(e.to_string().contains("closed"), "{e}"),
            Ok(Ok(_)) => panic!("an answer on a closed connection"),
            Err(_) => panic!("the request waited on a closed connection"),
        }
    }
}
