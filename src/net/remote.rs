//! A peer's copy of a folder, reached through a connection: what the engine
//! reads histories and chunks from when it syncs with a device over the network.
//!
//! Chunks are asked for in batches ([`Request::ReadChunks`]), and ahead of the
//! builds that need them when the merger says which come next
//! ([`Peer::prefetch`]). Every chunk is checked against its hash when it
//! arrives: a peer that sends a wrong one is logged and never asked for that
//! chunk again. Chunks are asked of every connected peer that shares the
//! folder, each request of the one expected to answer it first; a chunk a peer
//! does not have (or sent wrong) is asked of the others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tokio::runtime::Handle;
use tokio::task::{JoinError, JoinHandle};

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

/// How long a peer has to answer a chunk request, at least, before the next
/// best peer is asked too.
const RACE_AFTER: Duration = Duration::from_secs(1);

/// Hashes noted against peers.
#[derive(Clone, Default)]
pub struct PeerHashes(Arc<Mutex<HashSet<(PeerId, Hash)>>>);

/// The chunks each peer sent wrong (bytes without the chunk's hash): that peer
/// is not asked for them again while the daemon runs.
pub type WrongChunks = PeerHashes;

impl PeerHashes {
    fn lock(&self) -> MutexGuard<'_, HashSet<(PeerId, Hash)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, peer: &PeerId, hash: &Hash) -> bool {
        self.lock().contains(&(*peer, *hash))
    }

    fn insert(&self, peer: PeerId, hash: Hash) {
        self.lock().insert((peer, hash));
    }
}

/// The connections to the other peers that share a folder, as they are now.
pub type OtherPeers = Box<dyn Fn() -> Vec<Arc<Connection>> + Send + Sync>;

/// Bytes of chunks received from each peer.
type Received = Arc<Mutex<HashMap<PeerId, u64>>>;

pub struct RemoteFolder {
    /// The peer whose history is merged.
    connection: Arc<Connection>,
    /// The other peers that share the folder, connected now: asked for chunks
    /// too.
    others: OtherPeers,
    folder: String,
    replica: PeerId,
    handle: Handle,
    wrong: WrongChunks,
    /// The contents a peer answered it does not have (this round).
    lacking: PeerHashes,
    received: Received,
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
        others: OtherPeers,
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
            lacking: PeerHashes::default(),
            received: Received::default(),
            prefetched: Arc::default(),
        }
    }

    /// The peers chunks were received from so far, with their bytes: the
    /// merged peer first.
    pub fn received(&self) -> Vec<(PeerId, u64)> {
        let received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        let mut each: Vec<(PeerId, u64)> = received.iter().map(|(p, n)| (*p, *n)).collect();
        each.sort_by_key(|(peer, _)| *peer != self.connection.peer);
        each
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
            connections: std::iter::once(Arc::clone(&self.connection))
                .chain(
                    (self.others)()
                        .into_iter()
                        .filter(|c| c.peer != self.connection.peer),
                )
                .collect(),
            folder: self.folder.clone(),
            wrong: self.wrong.clone(),
            lacking: self.lacking.clone(),
            received: Arc::clone(&self.received),
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

/// Chunks to fetch (within one request's limits). They are asked of the peer
/// expected to answer first among those that may have them ([`Pace`]); a peer
/// slow to answer is raced by the next best one; what a peer did not have is
/// asked of the others.
struct Fetch {
    /// The merged peer first, then the others.
    connections: Vec<Arc<Connection>>,
    folder: String,
    wrong: WrongChunks,
    lacking: PeerHashes,
    received: Received,
    wanted: Vec<WantedChunk>,
}

/// The answers of one peer (by index in [`Fetch::connections`]) to the chunks
/// `indices` of [`Fetch::wanted`].
struct Answered {
    connection: usize,
    indices: Vec<usize>,
    answers: Result<Vec<Option<Vec<u8>>>>,
}

impl Fetch {
    /// Each chunk's bytes, checked against its hash; `None` for those no peer
    /// has. An error only if a peer failed and no other had them all.
    async fn run(self) -> Result<Vec<Option<Vec<u8>>>> {
        let mut found: Vec<Option<Vec<u8>>> = vec![None; self.wanted.len()];
        // The peers whose answers are in `found`: each is asked once.
        let mut answered = vec![false; self.connections.len()];
        let mut failed = None;
        loop {
            let mut ranked = self.ranked(&found, &answered).into_iter();
            let Some((first, indices)) = ranked.next() else {
                break;
            };
            let runner_up = ranked.find(|(_, theirs)| *theirs == indices);
            let runner_up = runner_up.map(|(connection, _)| connection);
            for done in self.ask_racing(first, runner_up, indices).await {
                answered[done.connection] = true;
                match done.answers {
                    Ok(answers) => {
                        for (i, bytes) in done.indices.into_iter().zip(answers) {
                            if bytes.is_some() {
                                found[i] = bytes;
                            }
                        }
                    }
                    Err(e) => {
                        let name = &self.connections[done.connection].name;
                        tracing::debug!("chunks from {name}: {e}");
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        match failed {
            Some(e) if found.iter().any(Option::is_none) => Err(e),
            _ => Ok(found),
        }
    }

    /// The peers not yet asked that may have some of the chunks not found, each
    /// with those chunks, the one expected to answer first first. A peer whose
    /// rate is not known yet is tried while it owes nothing, and else waited for.
    fn ranked(&self, found: &[Option<Vec<u8>>], answered: &[bool]) -> Vec<(usize, Vec<usize>)> {
        let mut ranked: Vec<(Duration, usize, Vec<usize>)> = Vec::new();
        for (c, connection) in self.connections.iter().enumerate() {
            if answered[c] || connection.is_closed() {
                continue;
            }
            let indices: Vec<usize> = (0..found.len())
                .filter(|&i| found[i].is_none())
                .filter(|&i| {
                    let wanted = &self.wanted[i];
                    !self
                        .wrong
                        .contains(&connection.peer, &Hash(wanted.chunk.hash))
                        && !self
                            .lacking
                            .contains(&connection.peer, &Hash(wanted.content))
                })
                .collect();
            if indices.is_empty() {
                continue;
            }
            let bytes = indices.iter().map(|&i| u64::from(self.wanted[i].chunk.len));
            let pace = &connection.pace;
            let wait = match pace.expected_wait(bytes.sum()) {
                Some(wait) => wait,
                None if pace.is_idle() => Duration::ZERO,
                None => Duration::MAX,
            };
            ranked.push((wait, c, indices));
        }
        // Stable: on a tie, the merged peer first.
        ranked.sort_by_key(|(wait, ..)| *wait);
        ranked
            .into_iter()
            .map(|(_, c, indices)| (c, indices))
            .collect()
    }

    /// Asks `first` for `indices`; if it is slow to answer, asks `runner_up`
    /// too, and takes the first answer with every chunk. What each peer that
    /// answered said. The other request runs on: its bytes come anyway, and its
    /// time tells that peer's pace.
    async fn ask_racing(
        &self,
        first: usize,
        runner_up: Option<usize>,
        indices: Vec<usize>,
    ) -> Vec<Answered> {
        let mut first_ask = self.ask(first, &indices);
        let answered = |connection: usize, answers: Result<Vec<Option<ByteBuf>>>| Answered {
            connection,
            indices: indices.clone(),
            answers: answers.and_then(|answers| self.checked(connection, &indices, answers)),
        };
        let Some(second) = runner_up else {
            return vec![answered(first, joined(first_ask.await))];
        };
        let expected = self.connections[first].pace.expected_wait(0);
        let patience = expected.map_or(RACE_AFTER, |wait| (4 * wait).max(RACE_AFTER));
        if let Ok(answers) = tokio::time::timeout(patience, &mut first_ask).await {
            return vec![answered(first, joined(answers))];
        }
        tracing::debug!(
            "{} is slow to send chunks; asking {} too",
            self.connections[first].name,
            self.connections[second].name
        );
        let mut second_ask = self.ask(second, &indices);
        let (winner, answers, loser, other) = tokio::select! {
            answers = &mut first_ask => (first, joined(answers), second, second_ask),
            answers = &mut second_ask => (second, joined(answers), first, first_ask),
        };
        // A first answer without every chunk (an error, or a peer without the
        // file): the other's is waited for, rather than asked for again.
        if matches!(&answers, Ok(all) if all.iter().all(Option::is_some)) {
            return vec![answered(winner, answers)];
        }
        vec![
            answered(winner, answers),
            answered(loser, joined(other.await)),
        ]
    }

    /// Sends the request for the chunks `indices` of `wanted` to one peer, as a
    /// task of its own.
    fn ask(&self, c: usize, indices: &[usize]) -> JoinHandle<Result<Vec<Option<ByteBuf>>>> {
        let connection = Arc::clone(&self.connections[c]);
        let request = Request::ReadChunks {
            folder: self.folder.clone(),
            wanted: indices.iter().map(|&i| self.wanted[i].clone()).collect(),
        };
        let bytes = indices.iter().map(|&i| u64::from(self.wanted[i].chunk.len));
        let ticket = connection.pace.asked(bytes.sum());
        let count = indices.len();
        tokio::spawn(async move {
            let answers = match connection.request(request).await? {
                Response::ChunkData(answers) if answers.len() == count => answers,
                Response::ChunkData(answers) => {
                    return Err(Error::Protocol(format!(
                        "{} answered {} of {count} chunks",
                        connection.name,
                        answers.len(),
                    )));
                }
                Response::Refused(reason) => return Err(refused(&connection, &reason)),
                _ => return Err(unexpected(&connection)),
            };
            ticket.answered();
            Ok(answers)
        })
    }

    /// One peer's answers to the chunks `indices` of `wanted`, checked: those
    /// it sent wrong are logged, remembered and `None`, and so are the
    /// contents it lacks.
    fn checked(
        &self,
        c: usize,
        indices: &[usize],
        answers: Vec<Option<ByteBuf>>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let connection = &self.connections[c];
        Ok(indices
            .iter()
            .zip(answers)
            .map(|(&i, bytes)| {
                let wanted = &self.wanted[i];
                let Some(bytes) = bytes.map(ByteBuf::into_vec) else {
                    self.lacking.insert(connection.peer, Hash(wanted.content));
                    return None;
                };
                let chunk = Hash(wanted.chunk.hash);
                if Hash::of(&bytes) == chunk {
                    let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
                    *received.entry(connection.peer).or_default() += bytes.len() as u64;
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

/// A request task's outcome.
fn joined<T>(outcome: std::result::Result<Result<T>, JoinError>) -> Result<T> {
    outcome.map_err(|e| Error::Internal(format!("a chunk request stopped: {e}")))?
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
        /// How long it takes to answer each request.
        delay: Duration,
        requests: AtomicUsize,
        chunks: AtomicUsize,
    }

    impl ChunkServer {
        fn new(holds: &[&[u8]], lies: bool) -> Arc<Self> {
            Self::with(holds, lies, Duration::ZERO)
        }

        /// An honest server that takes `delay` to answer.
        fn answering_in(holds: &[&[u8]], delay: Duration) -> Arc<Self> {
            Self::with(holds, false, delay)
        }

        fn with(holds: &[&[u8]], lies: bool, delay: Duration) -> Arc<Self> {
            Arc::new(ChunkServer {
                holds: holds.iter().map(|bytes| bytes.to_vec()).collect(),
                lies,
                delay,
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
            std::thread::sleep(self.delay);
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

    /// The ids of the two servers of [`two_peers`].
    const MERGED: PeerId = PeerId([1; 32]);
    const OTHER: PeerId = PeerId([2; 32]);

    /// A folder merged from `merged`, with `other` also connected.
    fn two_peers(
        runtime: &tokio::runtime::Runtime,
        merged: &Arc<ChunkServer>,
        other: &Arc<ChunkServer>,
        wrong: WrongChunks,
    ) -> RemoteFolder {
        let others = vec![connect(runtime, OTHER, Arc::clone(other))];
        merged_from(runtime, merged, Box::new(move || others.clone()), wrong)
    }

    /// A folder merged from `merged`, with `others` connected as they say.
    fn merged_from(
        runtime: &tokio::runtime::Runtime,
        merged: &Arc<ChunkServer>,
        others: OtherPeers,
        wrong: WrongChunks,
    ) -> RemoteFolder {
        RemoteFolder::new(
            connect(runtime, MERGED, Arc::clone(merged)),
            others,
            "docs".into(),
            PeerId([9; 32]),
            runtime.handle().clone(),
            wrong,
        )
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
        let runtime = runtime();
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"first content", b"second", b"third one");
        let liar = ChunkServer::new(&[a, b, c], true);
        let honest = ChunkServer::new(&[a, b, c], false);
        let (liar_id, honest_id) = (MERGED, OTHER);
        let wrong = WrongChunks::default();
        let remote = two_peers(&runtime, &liar, &honest, wrong.clone());
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

        // Asked for ahead, in one request to each peer at most; the liar is
        // asked only for what it has not sent wrong yet (which of the two is
        // asked first depends on their pace), and the builds are answered from
        // what came back.
        let soon: Vec<(&str, Hash, ChunkInfo)> = [a, b, c]
            .iter()
            .map(|bytes| ("f.txt", Hash::of(bytes), chunk_of(bytes)))
            .collect();
        remote.prefetch(&soon);
        for bytes in [a, b, c] {
            assert_eq!(read(bytes), Some(bytes.to_vec()));
        }
        let (liar_asked, honest_asked) = (liar.asked(), honest.asked());
        assert!([(1, 1), (2, 3)].contains(&liar_asked), "{liar_asked:?}");
        assert!([(2, 3), (2, 4)].contains(&honest_asked), "{honest_asked:?}");

        // A chunk no peer has is "not available", not an error.
        assert_eq!(read(b"nobody has this"), None);
    }

    /// `count` distinct chunks of 64 KiB, laid end to end.
    fn file_of_chunks(count: usize) -> (Vec<Vec<u8>>, Vec<ChunkInfo>) {
        let bytes: Vec<Vec<u8>> = (0..count)
            .map(|i| (0..64 << 10).map(|j| (i * 7 + j % 251) as u8).collect())
            .collect();
        let chunks = bytes
            .iter()
            .enumerate()
            .map(|(i, bytes)| ChunkInfo {
                offset: (i as u64) << 16,
                ..chunk_of(bytes)
            })
            .collect();
        (bytes, chunks)
    }

    /// Fetches `chunks` as a resumable build does: in windows of 4 chunks, each
    /// asked for before the one before is awaited. Checks every chunk's bytes.
    fn fetch_in_windows(
        remote: &RemoteFolder,
        content: &Hash,
        bytes: &[Vec<u8>],
        chunks: &[ChunkInfo],
    ) {
        let mut previous: Option<(usize, AskedChunks<'_>)> = None;
        for (w, window) in chunks.chunks(4).enumerate() {
            let asked = remote.ask_for_chunks("f.bin", content, window);
            if let Some((at, answers)) = previous.replace((w * 4, asked)) {
                check_window(answers, &bytes[at..]);
            }
        }
        if let Some((at, answers)) = previous {
            check_window(answers, &bytes[at..]);
        }
    }

    fn check_window(answers: AskedChunks<'_>, expected: &[Vec<u8>]) {
        let answers = answers().unwrap();
        for (got, expected) in answers.iter().zip(expected) {
            assert_eq!(got.as_deref(), Some(&expected[..]));
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_file_two_peers_hold_is_fetched_from_both() {
        let runtime = runtime();
        let (bytes, chunks) = file_of_chunks(48);
        let held: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        // Equally fast (each answer takes 20 ms, more than the pipe's own time).
        let merged = ChunkServer::answering_in(&held, Duration::from_millis(20));
        let other = ChunkServer::answering_in(&held, Duration::from_millis(20));
        let remote = two_peers(&runtime, &merged, &other, WrongChunks::default());
        fetch_in_windows(&remote, &Hash([5; 32]), &bytes, &chunks);

        // Each was asked once for each chunk it sent, and sent a fair share.
        let (from_merged, from_other) = (merged.asked().1, other.asked().1);
        assert_eq!(from_merged + from_other, 48);
        assert!(
            from_merged >= 12 && from_other >= 12,
            "{from_merged} and {from_other}"
        );
        let received = remote.received();
        assert_eq!(received.len(), 2, "{received:?}");
        assert_eq!(received.iter().map(|(_, n)| n).sum::<u64>(), 48 << 16);
    }

    #[test]
    fn a_peer_slow_to_answer_is_raced_by_the_next_and_then_given_little() {
        let runtime = runtime();
        let (bytes, chunks) = file_of_chunks(40);
        let held: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        // The merged peer, asked first, takes longer than the race's patience.
        let slow = ChunkServer::answering_in(&held, RACE_AFTER * 2);
        let fast = ChunkServer::answering_in(&held, Duration::ZERO);
        let remote = two_peers(&runtime, &slow, &fast, WrongChunks::default());
        let content = Hash([5; 32]);

        // The first window goes to the merged peer; the fast one is asked too
        // when the slow one keeps it waiting, and its answer is taken.
        let first = remote.ask_for_chunks("f.bin", &content, &chunks[..4]);
        check_window(first, &bytes);
        assert_eq!(slow.asked(), (1, 4));
        assert_eq!(fast.asked(), (1, 4));

        // Known to be slow, it is asked for nothing more.
        fetch_in_windows(&remote, &content, &bytes[4..], &chunks[4..]);
        assert_eq!(slow.asked(), (1, 4));
        assert_eq!(fast.asked().1, 40);
        assert_eq!(remote.received(), vec![(OTHER, 40 << 16)]);
    }

    #[test]
    fn a_racing_peer_without_the_file_leaves_the_slow_one_to_answer() {
        let runtime = runtime();
        let (bytes, chunks) = file_of_chunks(4);
        let held: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let slow = ChunkServer::answering_in(&held, RACE_AFTER * 2);
        let without = ChunkServer::answering_in(&[], Duration::ZERO);
        let remote = two_peers(&runtime, &slow, &without, WrongChunks::default());
        let asked = remote.ask_for_chunks("f.bin", &Hash([5; 32]), &chunks);
        check_window(asked, &bytes);
        // Raced, the other had nothing: the slow answer was waited for, and
        // not asked for twice.
        assert_eq!(without.asked(), (1, 4));
        assert_eq!(slow.asked(), (1, 4));
    }

    #[test]
    fn a_peer_that_connects_during_a_transfer_is_asked_from_then_on() {
        let runtime = runtime();
        let (bytes, chunks) = file_of_chunks(48);
        let held: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let merged = ChunkServer::answering_in(&held, Duration::from_millis(20));
        let late = ChunkServer::answering_in(&held, Duration::from_millis(20));
        let connected: Arc<Mutex<Vec<Arc<Connection>>>> = Arc::default();
        let now_connected = Arc::clone(&connected);
        let others = Box::new(move || now_connected.lock().unwrap().clone());
        let remote = merged_from(&runtime, &merged, others, WrongChunks::default());
        let content = Hash([5; 32]);
        fetch_in_windows(&remote, &content, &bytes[..16], &chunks[..16]);
        assert_eq!(merged.asked().1, 16);

        connected
            .lock()
            .unwrap()
            .push(connect(&runtime, OTHER, Arc::clone(&late)));
        fetch_in_windows(&remote, &content, &bytes[16..], &chunks[16..]);
        assert_eq!(merged.asked().1 + late.asked().1, 48);
        assert!(late.asked().1 >= 8, "{:?}", late.asked());
    }
}
