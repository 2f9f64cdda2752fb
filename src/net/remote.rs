//! A peer's copy of a folder, reached through a connection: what the engine
//! reads histories and chunks from when it syncs with a device over the network.
//!
//! Chunks are asked for in batches ([`Request::ReadChunks`]), and ahead of the
//! builds that need them when the merger says which come next
//! ([`Peer::prefetch`]). Every chunk is checked against its hash when it
//! arrives: a peer that sends a wrong one is logged and never asked for that
//! chunk again. A chunk the peer no longer has (or sent wrong) is asked of the
//! other connected peers that share the folder.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tokio::runtime::Handle;

use crate::content::{ChunkInfo, Hash};
use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::history::Entry;
use crate::net::conn::Connection;
use crate::net::protocol::{MAX_ENTRIES, Request, Response, WantedChunk, WireChunk, chunk_batches};
use crate::peer::{AskedChunks, Peer};

/// Bytes of chunks asked for ahead of their builds, at most, per folder and peer.
const PREFETCH_MAX_BYTES: usize = 4 << 20;
/// How long a build waits for a chunk asked for ahead before it asks again
/// itself (the request itself times out sooner).
const PREFETCH_WAIT: Duration = Duration::from_secs(90);

/// The chunks each peer sent wrong (bytes without the chunk's hash): that peer
/// is not asked for them again while the daemon runs.
#[derive(Clone, Default)]
pub struct WrongChunks(Arc<Mutex<HashSet<(PeerId, Hash)>>>);

impl WrongChunks {
    fn lock(&self) -> MutexGuard<'_, HashSet<(PeerId, Hash)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, peer: &PeerId, chunk: &Hash) -> bool {
        self.lock().contains(&(*peer, *chunk))
    }

    fn insert(&self, peer: PeerId, chunk: Hash) {
        self.lock().insert((peer, chunk));
    }
}

pub struct RemoteFolder {
    /// The peer whose history is merged.
    connection: Arc<Connection>,
    /// The other connected peers that share the folder: asked for the chunks
    /// the first one no longer has.
    others: Vec<Arc<Connection>>,
    folder: String,
    replica: PeerId,
    handle: Handle,
    wrong: WrongChunks,
    prefetched: Arc<Prefetched>,
}

/// Chunks asked for ahead of the builds that need them, by chunk hash.
#[derive(Default)]
struct Prefetched {
    slots: Mutex<Slots>,
    arrived: Condvar,
}

#[derive(Default)]
struct Slots {
    by_chunk: HashMap<Hash, Slot>,
    bytes: usize,
}

struct Slot {
    len: usize,
    state: SlotState,
}

enum SlotState {
    Asked,
    /// `None`: no peer has it.
    Arrived(Option<Vec<u8>>),
    /// The request failed: the build asks again itself.
    Failed,
}

impl Prefetched {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `chunk` if it was asked for ahead, waiting for it to arrive.
    fn take(&self, chunk: &Hash) -> Option<Option<Vec<u8>>> {
        let deadline = Instant::now() + PREFETCH_WAIT;
        let mut slots = self.slots();
        loop {
            match &slots.by_chunk.get(chunk)?.state {
                SlotState::Asked => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    slots = self
                        .arrived
                        .wait_timeout(slots, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                _ => {
                    let slot = slots.by_chunk.remove(chunk)?;
                    slots.bytes -= slot.len;
                    return match slot.state {
                        SlotState::Arrived(bytes) => Some(bytes),
                        _ => None,
                    };
                }
            }
        }
    }

    fn settle(&self, chunks: &[Hash], answers: Option<Vec<Option<Vec<u8>>>>) {
        let mut slots = self.slots();
        let mut answers = answers.map(Vec::into_iter);
        for chunk in chunks {
            let state = match &mut answers {
                Some(answers) => SlotState::Arrived(answers.next().flatten()),
                None => SlotState::Failed,
            };
            if let Some(slot) = slots.by_chunk.get_mut(chunk) {
                slot.state = state;
            }
        }
        drop(slots);
        self.arrived.notify_all();
    }
}

impl RemoteFolder {
    pub fn new(
        connection: Arc<Connection>,
        others: Vec<Arc<Connection>>,
        folder: String,
        replica: PeerId,
        handle: Handle,
        wrong: WrongChunks,
    ) -> Self {
        RemoteFolder {
            connection,
            others,
            folder,
            replica,
            handle,
            wrong,
            prefetched: Arc::default(),
        }
    }

    fn ask(&self, request: Request) -> Result<Response> {
        match self.handle.block_on(self.connection.request(request))? {
            Response::Refused(reason) => Err(refused(&self.connection, &reason)),
            response => Ok(response),
        }
    }

    /// What fetches `wanted` from the peers, to run on the runtime.
    fn fetcher(&self, wanted: Vec<WantedChunk>) -> Fetch {
        Fetch {
            connections: std::iter::once(&self.connection)
                .chain(&self.others)
                .cloned()
                .collect(),
            folder: self.folder.clone(),
            wrong: self.wrong.clone(),
            wanted,
        }
    }
}

fn refused(connection: &Connection, reason: &str) -> Error {
    Error::Peer(format!("{} refused: {reason}", connection.name))
}

fn unexpected(connection: &Connection) -> Error {
    Error::Protocol(format!(
        "{} answered with the wrong kind of reply",
        connection.name
    ))
}

fn wanted(path: &str, content: &Hash, chunk: &ChunkInfo) -> WantedChunk {
    WantedChunk {
        path: path.to_string(),
        content: content.0,
        chunk: WireChunk::from(chunk),
    }
}

/// Chunks to fetch (within one request's limits), from the first peer that
/// has each.
struct Fetch {
    /// The merged peer first, then the others.
    connections: Vec<Arc<Connection>>,
    folder: String,
    wrong: WrongChunks,
    wanted: Vec<WantedChunk>,
}

impl Fetch {
    /// Each chunk's bytes, checked against its hash; `None` for those no peer
    /// has. An error only if the merged peer failed and no other had them all.
    async fn run(self) -> Result<Vec<Option<Vec<u8>>>> {
        let mut found: Vec<Option<Vec<u8>>> = vec![None; self.wanted.len()];
        let mut failed = None;
        for connection in &self.connections {
            let missing: Vec<usize> = (0..found.len())
                .filter(|&i| found[i].is_none())
                .filter(|&i| {
                    !self
                        .wrong
                        .contains(&connection.peer, &Hash(self.wanted[i].chunk.hash))
                })
                .collect();
            if missing.is_empty() {
                continue;
            }
            match self.ask(connection, &missing).await {
                Ok(answers) => {
                    for (i, bytes) in missing.into_iter().zip(answers) {
                        found[i] = bytes;
                    }
                }
                Err(e) => {
                    tracing::debug!("chunks from {}: {e}", connection.name);
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) if found.iter().any(Option::is_none) => Err(e),
            _ => Ok(found),
        }
    }

    /// The chunks `indices` of `wanted` from one peer; those it sent wrong are
    /// logged, remembered and `None`.
    async fn ask(
        &self,
        connection: &Connection,
        indices: &[usize],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let request = Request::ReadChunks {
            folder: self.folder.clone(),
            wanted: indices.iter().map(|&i| self.wanted[i].clone()).collect(),
        };
        let answers = match connection.request(request).await? {
            Response::ChunkData(answers) if answers.len() == indices.len() => answers,
            Response::ChunkData(answers) => {
                return Err(Error::Protocol(format!(
                    "{} answered {} of {} chunks",
                    connection.name,
                    answers.len(),
                    indices.len()
                )));
            }
            Response::Refused(reason) => return Err(refused(connection, &reason)),
            _ => return Err(unexpected(connection)),
        };
        Ok(indices
            .iter()
            .zip(answers)
            .map(|(&i, bytes)| {
                let bytes = bytes.map(ByteBuf::into_vec)?;
                let wanted = &self.wanted[i];
                let chunk = Hash(wanted.chunk.hash);
                if Hash::of(&bytes) == chunk {
                    return Some(bytes);
                }
                tracing::warn!(
                    "{} sent a chunk of {:?} that does not match its hash; it will not be asked for that chunk again",
                    connection.name,
                    wanted.path
                );
                self.wrong.insert(connection.peer, chunk);
                None
            })
            .collect())
    }
}

impl Peer for RemoteFolder {
    fn id(&self) -> PeerId {
        self.replica
    }

    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Entry>> {
        let limit = u32::try_from(limit).unwrap_or(MAX_ENTRIES).min(MAX_ENTRIES);
        match self.ask(Request::ChangesSince {
            folder: self.folder.clone(),
            seq,
            limit,
        })? {
            Response::Changes(entries) => {
                let mut checked = Vec::with_capacity(entries.len());
                let mut last = seq;
                for entry in entries {
                    let entry = entry.checked()?;
                    if entry.seq <= last {
                        return Err(Error::Protocol("entries out of sequence".into()));
                    }
                    last = entry.seq;
                    checked.push(entry);
                }
                Ok(checked)
            }
            _ => Err(unexpected(&self.connection)),
        }
    }

    fn chunks_of(&self, content: &Hash) -> Result<Vec<ChunkInfo>> {
        match self.ask(Request::ChunksOf {
            folder: self.folder.clone(),
            content: content.0,
        })? {
            Response::Chunks(chunks) => chunks.iter().map(WireChunk::checked).collect(),
            _ => Err(unexpected(&self.connection)),
        }
    }

    fn read_chunk(&self, path: &str, content: &Hash, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        if let Some(answer) = self.prefetched.take(&chunk.hash) {
            return Ok(answer);
        }
        let fetch = self.fetcher(vec![wanted(path, content, chunk)]);
        Ok(self.handle.block_on(fetch.run())?.pop().flatten())
    }

    fn ask_for_chunks<'p>(
        &'p self,
        path: &str,
        content: &Hash,
        chunks: &[ChunkInfo],
    ) -> AskedChunks<'p> {
        // All the requests go out before the first answer is awaited.
        let wanted = chunks.iter().map(|c| wanted(path, content, c)).collect();
        let pending: Vec<_> = chunk_batches(wanted)
            .into_iter()
            .map(|batch| self.handle.spawn(self.fetcher(batch).run()))
            .collect();
        let count = chunks.len();
        Box::new(move || {
            self.handle.block_on(async {
                let mut answers = Vec::with_capacity(count);
                for task in pending {
                    answers.extend(
                        task.await.map_err(|e| {
                            Error::Internal(format!("a chunk request stopped: {e}"))
                        })??,
                    );
                }
                Ok(answers)
            })
        })
    }

    fn asked_ahead(&self, chunk: &Hash) -> bool {
        self.prefetched.slots().by_chunk.contains_key(chunk)
    }

    fn prefetch(&self, wanted_soon: &[(&str, Hash, ChunkInfo)]) -> usize {
        let mut asked = Vec::new();
        let mut covered = 0;
        {
            let mut slots = self.prefetched.slots();
            for (path, content, chunk) in wanted_soon {
                let len = chunk.len as usize;
                if slots.bytes + len > PREFETCH_MAX_BYTES {
                    break;
                }
                covered += 1;
                if slots.by_chunk.contains_key(&chunk.hash) {
                    continue;
                }
                slots.by_chunk.insert(
                    chunk.hash,
                    Slot {
                        len,
                        state: SlotState::Asked,
                    },
                );
                slots.bytes += len;
                asked.push(wanted(path, content, chunk));
            }
        }
        for batch in chunk_batches(asked) {
            let chunks: Vec<Hash> = batch.iter().map(|w| Hash(w.chunk.hash)).collect();
            let (fetch, prefetched) = (self.fetcher(batch), Arc::clone(&self.prefetched));
            self.handle.spawn(async move {
                let answers = fetch.run().await;
                if let Err(e) = &answers {
                    tracing::debug!("chunks asked for ahead: {e}");
                }
                prefetched.settle(&chunks, answers.ok());
            });
        }
        covered
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::net::conn::{self, RequestHandler};
    use crate::net::protocol::{Message, VERSION};

    /// A peer that answers chunk requests: with the bytes it holds that have the
    /// chunk's hash, or, if it lies, with other bytes.
    struct ChunkServer {
        holds: Vec<Vec<u8>>,
        lies: bool,
        requests: AtomicUsize,
        chunks: AtomicUsize,
    }

    impl ChunkServer {
        fn new(holds: &[&[u8]], lies: bool) -> Arc<Self> {
            Arc::new(ChunkServer {
                holds: holds.iter().map(|bytes| bytes.to_vec()).collect(),
                lies,
                requests: AtomicUsize::new(0),
                chunks: AtomicUsize::new(0),
            })
        }

        /// (requests, chunks) asked of it so far.
        fn asked(&self) -> (usize, usize) {
            (
                self.requests.load(Ordering::SeqCst),
                self.chunks.load(Ordering::SeqCst),
            )
        }
    }

    impl RequestHandler for ChunkServer {
        fn answer(&self, _peer: &PeerId, request: Request) -> Response {
            let Request::ReadChunks { wanted, .. } = request else {
                return Response::Refused("only chunks here".into());
            };
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.chunks.fetch_add(wanted.len(), Ordering::SeqCst);
            let answer = |w: &WantedChunk| match self.lies {
                true => Some(b"not what was asked for".to_vec()),
                false => self
                    .holds
                    .iter()
                    .find(|bytes| Hash::of(bytes).0 == w.chunk.hash)
                    .cloned(),
            };
            Response::ChunkData(
                wanted
                    .iter()
                    .map(|w| answer(w).map(ByteBuf::from))
                    .collect(),
            )
        }

        fn changed(&self, _peer: &PeerId, _folder: &str, _seq: u64) {}
    }

    /// A connection to `server` (whose id is `peer`) over an in-memory pipe.
    fn connect(
        runtime: &tokio::runtime::Runtime,
        peer: PeerId,
        server: Arc<ChunkServer>,
    ) -> Arc<Connection> {
        let hello = |name: &str| Message::Hello {
            version: VERSION,
            name: name.into(),
            folders: vec![("docs".into(), [9; 32])],
        };
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (up, connected) = std::sync::mpsc::channel();
        runtime.spawn(conn::run(
            theirs,
            PeerId([0; 32]),
            hello("them"),
            server,
            |_| {},
        ));
        let silent = ChunkServer::new(&[], false);
        runtime.spawn(conn::run(ours, peer, hello("us"), silent, move |c| {
            let _ = up.send(c);
        }));
        connected.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    fn chunk_of(bytes: &[u8]) -> ChunkInfo {
        ChunkInfo {
            hash: Hash::of(bytes),
            offset: 0,
            len: bytes.len() as u32,
        }
    }

    #[test]
    fn a_wrong_chunk_is_refused_remembered_and_fetched_from_another_peer() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"first content", b"second", b"third one");
        let liar = ChunkServer::new(&[a, b, c], true);
        let honest = ChunkServer::new(&[a, b, c], false);
        let (liar_id, honest_id) = (PeerId([1; 32]), PeerId([2; 32]));
        let wrong = WrongChunks::default();
        let remote = RemoteFolder::new(
            connect(&runtime, liar_id, Arc::clone(&liar)),
            vec![connect(&runtime, honest_id, Arc::clone(&honest))],
            "docs".into(),
            PeerId([9; 32]),
            runtime.handle().clone(),
            wrong.clone(),
        );
        let read = |bytes: &[u8]| {
            let chunk = chunk_of(bytes);
            remote.read_chunk("f.txt", &chunk.hash, &chunk).unwrap()
        };

        // The merged peer sends wrong bytes: they are refused, remembered, and the
        // other peer asked.
        assert_eq!(read(a), Some(a.to_vec()));
        assert!(wrong.contains(&liar_id, &Hash::of(a)));
        assert!(!wrong.contains(&honest_id, &Hash::of(a)));
        assert_eq!((liar.asked(), honest.asked()), ((1, 1), (1, 1)));

        // Asked for ahead, in one request; the liar is asked only for what it has
        // not sent wrong yet, and the builds are answered from what came back.
        let soon: Vec<(&str, Hash, ChunkInfo)> = [a, b, c]
            .iter()
            .map(|bytes| ("f.txt", Hash::of(bytes), chunk_of(bytes)))
            .collect();
        remote.prefetch(&soon);
        for bytes in [a, b, c] {
            assert_eq!(read(bytes), Some(bytes.to_vec()));
        }
        assert_eq!((liar.asked(), honest.asked()), ((2, 3), (2, 4)));

        // A chunk no peer has is "not available", not an error.
        assert_eq!(read(b"nobody has this"), None);
    }
}
