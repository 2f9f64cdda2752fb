//! `latus serve`: keeps this device's folders in sync with its peers over the
//! network, continuously. It listens for known peers (mutual TLS, pinned ids),
//! dials those it has addresses for (with backoff), and runs one sync loop per
//! folder: scan, receive each connected peer's new history entries, plan, and
//! apply, reading the content it lacks from that peer. Each side pulls what the
//! other changed, so changes travel both ways.
//!
//! A file-system watcher (inotify through `notify`) wakes a folder's loop once its
//! changes have been quiet for `watch_delay`; a full rescan still runs every
//! `rescan_interval`, because watchers drop events. A peer's "changed" message
//! wakes the loop at once.
//!
//! A file built from a peer's chunks is assembled in `.latus/partial/` and kept
//! if the daemon is stopped or killed: the next build takes the chunks already
//! there (see [`MergeOptions::resumable`]). After a round without errors, the
//! partial files no plan builds any more, or untouched for a week, are removed
//! ([`merge::clean_partials`]).
//!
//! A peer's chunk request that this folder's disk can no longer answer (the file
//! changed since it was scanned, and the watcher did not say) is answered "not
//! available" and wakes the folder's loop as the watcher would: the rescan
//! records the change, and the peer then asks for the new content.
//!
//! A path the merger deferred (changed here since its scan) is rescanned within
//! a second even if the watcher said nothing, and a failed round is run again;
//! while such retries keep coming back, their delay doubles up to five minutes.
//!
//! The share list (`device.db`) is watched too: a folder added or shared, or a
//! peer added or removed, while the daemon runs takes effect at once; the
//! connections of a peer whose shares changed are closed, so both sides say
//! hello again with what they now share. With an XMPP account ([`crate::xmpp`]),
//! peers are also dialled at the addresses they announce there.
//!
//! The log goes to stderr and to daily files in `<data dir>/logs/` (the last
//! [`LOG_FILES_KEPT`] kept; `latus.log` links to the current one).
//!
//! A round scans only the paths the watcher named since the last one (and what
//! is under them); a folder is scanned whole in its first round, at each
//! periodic rescan (jittered), and when the watcher lost track.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use notify::Watcher;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use rustls::pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_xmpp::jid::BareJid;

use crate::content::Hash;
use crate::device::{Home, PeerId};
use crate::diff;
use crate::error::{Error, Result};
use crate::folder::Folder;
use crate::history::HistoryStore;
use crate::identity::Identity;
use crate::merge::{self, MergeOptions};
use crate::net::conn::{self, Connection, RequestHandler};
use crate::net::protocol::{
    CHUNK_BYTES_PER_BATCH, MAX_ENTRIES, MAX_FRAME, Message, Request, Response, VERSION, WireChunk,
    WireEntry,
};
use crate::net::remote::{OtherPeers, RemoteFolder, WrongChunks};
use crate::net::tls::{self, Allowed};
use crate::peer::{FolderPeer, Peer};
use crate::scan::{self, ScanOptions};
use crate::shares::{KnownPeer, SharedFolder, Shares};
use crate::sync::{self as local_sync, SyncOptions};
use crate::trash;
use crate::xmpp::{self, XmppClient, XmppConfig, XmppEvents, XmppState};

/// The file in the data directory that holds the address `latus serve` listens on.
pub const ADDR_FILE: &str = "serve.addr";
/// The directory in the data directory holding the daemon's log files.
pub const LOG_DIR: &str = "logs";
/// The log files' name (a date is appended); also the link to the current one.
pub const LOG_FILE: &str = "latus.log";
/// Daily log files kept: a week.
pub const LOG_FILES_KEPT: usize = 7;
pub const DEFAULT_LISTEN: &str = "0.0.0.0:22400";
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct ServeOptions {
    pub listen: String,
    /// Time between two full rescans when the watcher reports nothing.
    pub rescan_interval: Duration,
    /// How long changes must be quiet before the watcher wakes a sync.
    pub watch_delay: Duration,
    pub sync: SyncOptions,
}

/// The file in the data directory where a running daemon keeps its status.
pub const STATUS_FILE: &str = "status.json";

/// `latus wait` makes a file of this prefix in the data directory (its wait
/// mark), which the daemon watches with the folders. The watcher reads events
/// in the order they happened, so once it has read the mark's creation, every
/// change on disk made before is known to the daemon: waiting, or scanned.
pub const WAIT_MARK_PREFIX: &str = "wait-";

/// The wait marks the status lists: more than waits at once.
const WAIT_MARKS_KEPT: usize = 16;

/// What `latus status` shows: written by the daemon as things change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub device: String,
    pub listen: String,
    pub folders: Vec<FolderStatus>,
    pub peers: Vec<PeerStatus>,
    pub xmpp: Option<XmppStatus>,
    /// The wait marks the watcher has read, the newest last; `None` when the
    /// data directory is not watched (and marks would never be read).
    #[serde(default)]
    pub wait_marks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XmppStatus {
    pub jid: String,
    /// "connecting", "online", "reconnecting (…)", "authentication failed", …
    pub state: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FolderStatus {
    pub id: String,
    pub path: PathBuf,
    /// "scanning", "syncing" or "idle".
    pub state: String,
    /// While syncing: the changes of the round not yet applied, and the bytes
    /// of the files among them still to build.
    #[serde(default)]
    pub files_left: u64,
    #[serde(default)]
    pub bytes_left: u64,
    /// Unix time (seconds) of the last round that finished.
    pub last_synced: Option<u64>,
    /// Conflict copies made since the daemon started.
    pub conflicts: usize,
    pub last_error: Option<String>,
    /// How far each peer (by name) said its history of the folder reaches, over
    /// a connection or XMPP: news even from a peer that cannot be reached directly.
    pub announced: BTreeMap<String, u64>,
    /// How far this device's history of the folder is shown to peers.
    #[serde(default)]
    pub seq: u64,
    /// The watcher noticed changes on disk that no round has scanned yet.
    #[serde(default)]
    pub waiting: bool,
    /// How far each peer's (by name) history of the folder is applied here.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
}

impl FolderStatus {
    /// Every change this device noticed in the folder is scanned and shown to peers.
    pub fn scanned(&self) -> bool {
        self.state == "idle"
            && !self.waiting
            && self.last_synced.is_some()
            && self.last_error.is_none()
    }

    /// This device has applied `peer`'s history of the folder up to `seq`.
    pub fn has_applied(&self, peer: &str, seq: u64) -> bool {
        self.applied
            .get(peer)
            .is_some_and(|&applied| applied >= seq)
    }
}

/// A wait mark, removed when dropped (the daemon also removes those it read).
pub struct WaitMark {
    path: PathBuf,
    name: String,
}

impl WaitMark {
    pub fn make(home: &Home) -> Result<WaitMark> {
        let name = format!(
            "{WAIT_MARK_PREFIX}{}-{}",
            std::process::id(),
            crate::now_ns()
        );
        let path = home.data_dir.join(&name);
        std::fs::File::create_new(&path).map_err(|e| Error::io(&path, e))?;
        Ok(WaitMark { path, name })
    }
}

impl Drop for WaitMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Status {
    /// The daemon has read `mark`: what changed on disk before it was made
    /// shows in this status.
    pub fn has_read(&self, mark: &WaitMark) -> bool {
        self.wait_marks
            .as_ref()
            .is_some_and(|marks| marks.contains(&mark.name))
    }

    /// `folder` is in sync as far as this device can tell: scanned, and each
    /// connected peer's history applied as far as that peer announced it.
    pub fn in_sync(&self, folder: &FolderStatus) -> bool {
        folder.scanned()
            && self.peers.iter().filter(|peer| peer.connected).all(|peer| {
                folder
                    .announced
                    .get(&peer.name)
                    .is_none_or(|&seq| folder.has_applied(&peer.name, seq))
            })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub name: String,
    pub connected: bool,
    /// Unix time (seconds) it was last connected.
    pub last_seen: Option<u64>,
    pub addrs: Vec<String>,
    /// The addresses it announced over XMPP.
    pub discovered: Vec<String>,
}

type Published = Arc<Mutex<HashMap<String, u64>>>;

fn published_seq(published: &Published, folder: &str) -> u64 {
    let published = published.lock().unwrap_or_else(|p| p.into_inner());
    published.get(folder).copied().unwrap_or(0)
}

fn publish(published: &Published, folder: &str, seq: u64) {
    published
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(folder.to_string(), seq);
}

/// Why and when the sync loop should run again.
#[derive(Default)]
struct Wake {
    /// A peer changed something, or connected: sync now.
    now: bool,
    /// The watcher's first and last events in a synced folder since the last sync.
    events: Option<(Instant, Instant)>,
    /// What changed in each folder (by path) since the last round.
    changed: HashMap<PathBuf, Changed>,
}

/// What changed in one folder since its last round: what its next scan looks at.
#[derive(Debug)]
enum Changed {
    /// These paths, and what is under them.
    Paths(BTreeSet<String>),
    /// Anything: the watcher lost track (its queue overflowed), or named too
    /// many paths to be worth scanning one by one.
    Whole,
}

/// Paths remembered per folder between rounds at most; beyond, the folder is
/// scanned whole.
const MAX_CHANGED_PATHS: usize = 10_000;

/// Changes that never pause (a file appended to all the time) are synced
/// at least this many `watch_delay`s after the first of them.
const MAX_DELAYS: u32 = 10;

/// What the listener, the dialers and the folder loops share.
struct Daemon {
    identity: Identity,
    name: String,
    data_dir: PathBuf,
    allowed: Allowed,
    folders: RwLock<Vec<SharedFolder>>,
    peers: RwLock<Vec<KnownPeer>>,
    /// The addresses peers announced over XMPP, dialled besides the configured ones.
    discovered: Mutex<HashMap<PeerId, Vec<String>>>,
    /// Wakes the dialers when a peer announced new addresses.
    addrs_changed: Notify,
    xmpp: Mutex<Option<XmppClient>>,
    /// The peers a dial loop runs for.
    dialing: Mutex<HashSet<PeerId>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    watcher_pause: Arc<WatcherPause>,
    /// The folder paths the watcher watches.
    watched: Mutex<HashSet<PathBuf>>,
    connections: Mutex<HashMap<PeerId, Vec<Arc<Connection>>>>,
    /// Folder sources answering peers' requests, one per folder id.
    sources: Mutex<HashMap<String, Arc<FolderPeer>>>,
    /// This device's replica id of each folder (the author of its versions).
    replicas: RwLock<HashMap<String, PeerId>>,
    /// How far each folder's history is shown to peers: to the end of the last
    /// finished round. A scan half done would show a move's deletions without
    /// its new paths (or the reverse), and peers would fetch what they could
    /// have renamed. Only a folder's first scan is shown batch by batch.
    published: Published,
    /// The chunks each peer sent wrong: not asked of it again.
    wrong_chunks: WrongChunks,
    wake: (Mutex<Wake>, Condvar),
    /// Set on SIGTERM or Ctrl-C; also stops a scan under way.
    stop: Arc<AtomicBool>,
    /// Held while the share list is applied: by the sync loop before each
    /// round, and as soon as `device.db` changes (see `reload_shares_now`).
    applying_shares: Mutex<()>,
    /// A reload of the share list is on its way.
    shares_reload_pending: AtomicBool,
    status: Mutex<Status>,
}

/// Threads answering peers' requests (and other blocking work) at most.
const BLOCKING_THREADS: usize = 8;

/// glibc gives each thread that allocates its own arena (up to 8 per core), and
/// the daemon's many short-lived threads leave each arena's freed memory resident:
/// two arenas halve the daemon's peak RSS at no measurable cost in speed.
/// glibc also raises its mmap threshold to the size of each large buffer freed,
/// after which such buffers stay in the arenas once freed: fixed, buffers larger
/// than any chunk batch (1 MiB) are mapped apart and given back when freed. Up
/// to 16 MiB free at the top of a heap (a few batches in flight) is kept, not
/// returned and faulted in again.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; any value is valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// Runs until Ctrl-C or SIGTERM.
pub fn serve(home: &Home, options: ServeOptions) -> Result<()> {
    limit_malloc_arenas();
    let identity = home.identity()?;
    let shares = Shares::open(&home.data_dir)?;
    let peers = shares.peers()?;
    let daemon = Arc::new(Daemon {
        name: hostname(),
        data_dir: home.data_dir.clone(),
        allowed: Arc::new(RwLock::new(peers.iter().map(|p| p.id).collect())),
        folders: RwLock::new(shares.folders()?),
        peers: RwLock::new(peers.clone()),
        discovered: Mutex::new(HashMap::new()),
        addrs_changed: Notify::new(),
        xmpp: Mutex::new(None),
        dialing: Mutex::new(HashSet::new()),
        watcher: Mutex::new(None),
        watcher_pause: Arc::default(),
        watched: Mutex::new(HashSet::new()),
        connections: Mutex::new(HashMap::new()),
        sources: Mutex::new(HashMap::new()),
        replicas: RwLock::new(HashMap::new()),
        published: Arc::default(),
        wrong_chunks: WrongChunks::default(),
        wake: (Mutex::new(Wake::default()), Condvar::new()),
        stop: Arc::new(AtomicBool::new(false)),
        applying_shares: Mutex::new(()),
        shares_reload_pending: AtomicBool::new(false),
        status: Mutex::new(Status {
            pid: std::process::id(),
            device: identity.peer_id().to_string(),
            peers: peers
                .iter()
                .map(|p| PeerStatus {
                    id: p.id.to_string(),
                    name: p.name.clone(),
                    addrs: p.addrs.clone(),
                    ..PeerStatus::default()
                })
                .collect(),
            ..Status::default()
        }),
        identity,
    });
    tracing::info!("device {}", daemon.identity.peer_id());
    // Each folder's history (and replica id) exists before a peer hears of it.
    for folder in daemon
        .folders
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        if let Err(e) = daemon.prepare(folder) {
            tracing::warn!("folder {}: {e}", folder.id);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Answering peers' requests reads the disk: a few reads at once keep it
        // busy; hundreds of threads would only cost memory.
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    let listener = runtime
        .block_on(TcpListener::bind(&options.listen))
        .map_err(|e| Error::io(&options.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io(&options.listen, e))?;
    tracing::info!("listening on {bound}");
    let addr_file = home.data_dir.join(ADDR_FILE);
    // Through a rename: a reader never sees the file half written.
    let addr_tmp = home.data_dir.join(format!("{ADDR_FILE}.tmp"));
    std::fs::write(&addr_tmp, format!("{bound}\n"))
        .and_then(|()| std::fs::rename(&addr_tmp, &addr_file))
        .map_err(|e| Error::io(&addr_file, e))?;
    daemon.update_status(|status| status.listen = bound.to_string());

    runtime.spawn(accept_loop(Arc::clone(&daemon), listener));
    daemon.start_dialers(runtime.handle());
    match XmppConfig::load(home) {
        Ok(Some(config)) => start_xmpp(&daemon, home, config, bound),
        Ok(None) => {}
        Err(e) => tracing::warn!("not using XMPP: {e}"),
    }
    watch(&daemon, runtime.handle().clone());
    let syncer = {
        let (daemon, handle) = (Arc::clone(&daemon), runtime.handle().clone());
        std::thread::spawn(move || sync_loop(&daemon, &handle, &options))
    };
    runtime.block_on(shutdown_signal());
    tracing::info!("stopping");
    daemon.stop.store(true, Ordering::Relaxed);
    daemon.wake_up();
    // The round under way finishes its file (every placement is atomic).
    let _ = syncer.join();
    let xmpp = daemon.xmpp.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(xmpp) = xmpp {
        xmpp.stop();
    }
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(home.data_dir.join(STATUS_FILE));
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "latus".into())
}

impl Daemon {
    /// Changes the status and writes it out (through a temp file and a rename,
    /// so `latus status` never reads half of it).
    fn update_status(&self, change: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut status);
        let path = self.data_dir.join(STATUS_FILE);
        let tmp = self.data_dir.join(format!("{STATUS_FILE}.tmp"));
        let written = serde_json::to_vec_pretty(&*status)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("{}: {e}", path.display());
        }
    }

    fn folder_status(&self, id: &str, change: impl FnOnce(&mut FolderStatus)) {
        self.update_status(|status| {
            if let Some(folder) = status.folders.iter_mut().find(|f| f.id == id) {
                change(folder);
            }
        });
    }

    fn peer_status(&self, peer: &PeerId, connected: bool) {
        let id = peer.to_string();
        let now = unix_seconds();
        self.update_status(|status| {
            if let Some(entry) = status.peers.iter_mut().find(|p| p.id == id) {
                entry.connected = connected;
                entry.last_seen = Some(now);
            }
        });
    }

    fn wake_up(&self) {
        let (wake, condvar) = &self.wake;
        wake.lock().unwrap_or_else(|p| p.into_inner()).now = true;
        condvar.notify_all();
    }

    /// If `path`, just created in the data directory, is a wait mark: lists it
    /// as read (after every change on disk read before it) and removes it.
    fn read_wait_mark(&self, path: &Path) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        if !name.starts_with(WAIT_MARK_PREFIX) {
            return;
        }
        self.update_status(|status| {
            let marks = status.wait_marks.get_or_insert_with(Vec::new);
            if marks.len() >= WAIT_MARKS_KEPT {
                marks.remove(0);
            }
            marks.push(name.to_string());
        });
        let _ = std::fs::remove_file(path);
    }

    /// Something changed at `paths` (absolute): they are scanned once changes
    /// are quiet. With `lost_track` (the watcher's queue overflowed), anything
    /// may have changed: every folder is scanned whole.
    fn files_changed(&self, paths: &[PathBuf], lost_track: bool) {
        let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let (wake, condvar) = &self.wake;
        let now = Instant::now();
        let mut state = wake.lock().unwrap_or_else(|p| p.into_inner());
        let folders_waiting = state.changed.len();
        if lost_track {
            tracing::info!(
                "the watcher lost track of changes (its queue overflowed): every folder is scanned whole"
            );
            for root in watched.iter() {
                state.changed.insert(root.clone(), Changed::Whole);
            }
        }
        for path in paths {
            // The innermost folder holding the path.
            let Some((root, rel)) = watched
                .iter()
                .filter_map(|root| Some((root, relative_under(root, path)?)))
                .max_by_key(|(root, _)| root.as_os_str().len())
            else {
                continue;
            };
            let changed = state
                .changed
                .entry(root.clone())
                .or_insert_with(|| Changed::Paths(BTreeSet::new()));
            match (rel, &mut *changed) {
                (Some(rel), Changed::Paths(paths))
                    if !rel.is_empty() && paths.len() < MAX_CHANGED_PATHS =>
                {
                    paths.insert(rel);
                }
                _ => *changed = Changed::Whole,
            }
        }
        // The waiter needs waking for the first change of a burst only: it
        // learns of the later ones when it wakes at the end of the first's delay.
        let first_of_burst = state.events.is_none();
        state.events = Some((state.events.map_or(now, |(first, _)| first), now));
        // Written while the wake state is locked, so that the end of a round
        // (which reads it) cannot overwrite this with an older answer.
        if state.changed.len() > folders_waiting {
            self.update_status(|status| {
                for folder in &mut status.folders {
                    if state.changed.contains_key(&folder.path) {
                        folder.waiting = true;
                    }
                }
            });
        }
        drop(state);
        if first_of_burst {
            condvar.notify_all();
        }
    }

    /// Waits for a reason to sync: a peer's news, changes on disk quiet for
    /// `watch_delay`, the next full rescan (at `rescan_at`), or the stop.
    /// Returns what the watcher saw meanwhile.
    fn wait(&self, options: &ServeOptions, rescan_at: Instant) -> Wake {
        let (wake, condvar) = &self.wake;
        let mut state = wake.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            if self.stop.load(Ordering::Relaxed) || state.now || now >= rescan_at {
                break;
            }
            let until = match state.events {
                Some((first, last)) => {
                    let due =
                        (last + options.watch_delay).min(first + options.watch_delay * MAX_DELAYS);
                    if now >= due {
                        break;
                    }
                    due.min(rescan_at)
                }
                None => rescan_at,
            };
            state = condvar
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::take(&mut *state)
    }

    /// The hello for `peer`: the folders shared with it, with this side's replica ids.
    fn hello_for(&self, peer: &PeerId) -> Message {
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let folders = self
            .folders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|f| f.peers.contains(peer))
            .filter_map(|f| Some((f.id.clone(), replicas.get(&f.id)?.0)))
            .collect();
        Message::Hello {
            version: VERSION,
            name: self.name.clone(),
            folders,
        }
    }

    /// Makes the folder's `.latus/` and history if missing; notes its replica id.
    fn prepare(&self, folder: &SharedFolder) -> Result<()> {
        let opened = Folder::open_or_create(&folder.path)?;
        let store = HistoryStore::open(&opened.history_path())?;
        let replica = store.replica_id()?;
        publish(&self.published, &folder.id, store.last_seq()?);
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(folder.id.clone(), replica);
        Ok(())
    }

    /// The chunk and history source of a folder, opened once.
    fn source(&self, folder: &SharedFolder) -> Result<Arc<FolderPeer>> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = sources.get(&folder.id) {
            return Ok(Arc::clone(source));
        }
        let source = Arc::new(FolderPeer::open(&Folder::open(&folder.path)?)?);
        sources.insert(folder.id.clone(), Arc::clone(&source));
        Ok(source)
    }

    fn shared_folder(&self, peer: &PeerId, id: &str) -> Option<SharedFolder> {
        self.folders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|f| f.id == id && f.peers.contains(peer))
            .cloned()
    }

    fn add_connection(&self, connection: Arc<Connection>) {
        tracing::info!("connected to {} ({})", connection.name, connection.peer);
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let list = connections.entry(connection.peer).or_default();
        list.retain(|c| !c.is_closed());
        let peer = connection.peer;
        list.push(connection);
        drop(connections);
        self.peer_status(&peer, true);
        self.wake_up();
    }

    /// Reads the share list and applies it (see `apply_shares`).
    fn reload_shares(self: &Arc<Self>, handle: &Handle) {
        let _one_at_a_time = self
            .applying_shares
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match Shares::open(&self.data_dir).and_then(|s| Ok((s.folders()?, s.peers()?))) {
            Ok((folders, peers)) => self.apply_shares(handle, folders, peers),
            Err(e) => tracing::warn!("reading the share list: {e}"),
        }
    }

    /// Applies the share list at once, beside the round under way (which may
    /// last hours): a removed peer or an unshared folder is cut off now. On a
    /// thread of its own: the watcher's thread, which calls this, must stay
    /// free to add and remove the watches it asks for.
    fn reload_shares_now(self: &Arc<Self>, handle: &Handle) {
        // One write to `device.db` raises several events: one reload for them.
        if self.stop.load(Ordering::Relaxed)
            || self.shares_reload_pending.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let daemon = Arc::clone(self);
        let on_runtime = handle.clone();
        handle.spawn_blocking(move || {
            daemon.shares_reload_pending.store(false, Ordering::Release);
            daemon.reload_shares(&on_runtime);
        });
    }

    /// Takes the share list as `latus peer`/`latus folder` left it (read before
    /// each round, and as soon as it changes): new folders are prepared and
    /// watched, removed ones let go, new peers dialled, and the
    /// connections of peers whose shares changed are closed, so that both
    /// sides say hello again with the folders they now share.
    fn apply_shares(
        self: &Arc<Self>,
        handle: &Handle,
        folders: Vec<SharedFolder>,
        peers: Vec<KnownPeer>,
    ) {
        let shares_of = |folders: &[SharedFolder]| {
            let mut shares: HashMap<PeerId, BTreeSet<String>> = HashMap::new();
            for folder in folders {
                for peer in &folder.peers {
                    shares.entry(*peer).or_default().insert(folder.id.clone());
                }
            }
            shares
        };
        let old_folders = self
            .folders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let before = shares_of(&old_folders);
        let after = shares_of(&folders);
        // Removed, or moved to another path.
        let gone: Vec<&SharedFolder> = old_folders
            .iter()
            .filter(|old| !folders.iter().any(|f| f.id == old.id && f.path == old.path))
            .collect();
        for folder in &gone {
            self.forget(folder);
        }
        // A new folder's history and replica id exist before a hello names it.
        let prepared: HashSet<String> = self
            .replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for folder in folders.iter().filter(|f| !prepared.contains(&f.id)) {
            if let Err(e) = self.prepare(folder) {
                tracing::warn!("folder {}: {e}", folder.id);
            }
        }
        *self.folders.write().unwrap_or_else(|p| p.into_inner()) = folders;
        *self.allowed.write().unwrap_or_else(|p| p.into_inner()) =
            peers.iter().map(|p| p.id).collect();
        self.update_status(|status| {
            let mut known = std::mem::take(&mut status.peers);
            status.peers = peers
                .iter()
                .map(|p| {
                    let id = p.id.to_string();
                    let old = known
                        .iter()
                        .position(|k| k.id == id)
                        .map(|i| known.swap_remove(i))
                        .unwrap_or_default();
                    PeerStatus {
                        id,
                        name: p.name.clone(),
                        addrs: p.addrs.clone(),
                        ..old
                    }
                })
                .collect();
        });
        let contacts = contacts_of(&peers);
        let old_peers = std::mem::replace(
            &mut *self.peers.write().unwrap_or_else(|p| p.into_inner()),
            peers,
        );
        if contacts_of(&old_peers) != contacts
            && let Some(xmpp) = &*self.xmpp.lock().unwrap_or_else(|p| p.into_inner())
        {
            xmpp.set_contacts(contacts);
        }
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, list) in connections.iter() {
            // A folder at another path has another replica id: hello again.
            let moved = gone.iter().any(|f| f.peers.contains(peer));
            if before.get(peer) != after.get(peer) || moved {
                tracing::info!("the folders shared with {peer} changed: reconnecting");
                list.iter().for_each(|c| c.close());
            }
        }
        drop(connections);
        self.start_dialers(handle);
        self.watch_folders();
    }

    /// Lets go of a folder removed from the share list, or moved to another
    /// path: its watch, its open history and its replica id (read again from
    /// the new path, if any).
    fn forget(&self, folder: &SharedFolder) {
        tracing::info!(
            "folder {}: no longer synced at {}",
            folder.id,
            folder.path.display()
        );
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&folder.id);
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&folder.id);
        // Not locked while unwatching: see `watch_folders`.
        let was_watched = self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&folder.path);
        if was_watched
            && let Some(watcher) = self
                .watcher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            && let Err(e) = watcher.unwatch(&folder.path)
        {
            tracing::debug!("{}: {e}", folder.path.display());
        }
    }

    /// A dial loop for each known peer that has none.
    fn start_dialers(self: &Arc<Self>, handle: &Handle) {
        let peers: Vec<PeerId> = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| p.id)
            .collect();
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        for peer in peers {
            // Every known peer: those without an address may announce one over XMPP.
            if dialing.insert(peer) {
                handle.spawn(dial_loop(Arc::clone(self), peer));
            }
        }
    }

    /// Watches the folders not watched yet.
    fn watch_folders(&self) {
        let mut watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        let Some(watcher) = watcher.as_mut() else {
            return;
        };
        // Not locked while watching: the watcher's thread, which adds the
        // watches, may be waiting for that lock in the event handler.
        let unwatched: Vec<SharedFolder> = {
            let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            let folders = self.folders.read().unwrap_or_else(|p| p.into_inner());
            folders
                .iter()
                .filter(|folder| !watched.contains(&folder.path))
                .cloned()
                .collect()
        };
        for folder in unwatched {
            match watcher.watch(&folder.path, notify::RecursiveMode::Recursive) {
                Ok(()) => {
                    self.watched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(folder.path.clone());
                }
                Err(e) => tracing::warn!(
                    "folder {}: not watched ({e}); changes are found by rescans",
                    folder.id
                ),
            }
        }
    }

    /// Returns once the watcher's thread has handled every event it had read,
    /// and so has watched the directories those events created. It watches a new
    /// directory only after handing us the event, and the files written into it
    /// before then raise none: a scan of that directory must read it after the
    /// watch exists, or the files written in between are missed until the next
    /// full rescan. (notify's inotify backend answers requests, this one
    /// included, on the thread that handles events, between batches.) That
    /// thread's pauses are cut short meanwhile, or a round would wait for one.
    fn watcher_caught_up(&self) {
        let watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watcher) = watcher.as_ref() {
            self.watcher_pause.set_awaited(true);
            let _ = watcher.watched_paths();
            self.watcher_pause.set_awaited(false);
        }
    }

    fn known_peer(&self, peer: &PeerId) -> Option<KnownPeer> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|p| p.id == *peer)
            .cloned()
    }

    /// The configured addresses of `peer`, then those it announced over XMPP.
    fn addrs_of(&self, peer: &PeerId) -> Vec<String> {
        let mut addrs = self.known_peer(peer).map(|p| p.addrs).unwrap_or_default();
        let discovered = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
        for addr in discovered.get(peer).into_iter().flatten() {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        addrs
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .is_some_and(|list| list.iter().any(|c| !c.is_closed()))
    }

    /// A live connection to each peer that shares `folder` with this device.
    fn connections_for(&self, folder: &SharedFolder) -> Vec<Arc<Connection>> {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        folder
            .peers
            .iter()
            .filter_map(|peer| {
                connections
                    .get(peer)?
                    .iter()
                    .find(|c| !c.is_closed() && c.folders.contains_key(&folder.id))
                    .cloned()
            })
            .collect()
    }
}

impl RequestHandler for Daemon {
    fn answer(&self, peer: &PeerId, request: Request) -> Response {
        let folder_id = match &request {
            Request::ChangesSince { folder, .. }
            | Request::ChunksOf { folder, .. }
            | Request::ReadChunks { folder, .. } => folder.clone(),
        };
        let Some(folder) = self.shared_folder(peer, &folder_id) else {
            tracing::warn!(
                "peer {peer} asked for folder {folder_id:?}, which is not shared with it"
            );
            return Response::Refused(format!("folder {folder_id:?} is not shared with you"));
        };
        let answer = || -> Result<Response> {
            let source = self.source(&folder)?;
            Ok(match request {
                Request::ChangesSince { seq, limit, .. } => {
                    let limit = limit.clamp(1, MAX_ENTRIES) as usize;
                    let shown = self
                        .published
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&folder.id)
                        .copied()
                        .unwrap_or(0);
                    let mut entries = source.changes_since(seq, limit)?;
                    entries.retain(|e| e.seq <= shown);
                    // Long paths could make a frame too big: cut the batch short.
                    let mut bytes = 0;
                    let fits = entries
                        .iter()
                        .take_while(|e| {
                            bytes +=
                                200 + e.path.len() + e.link_target.as_ref().map_or(0, String::len);
                            bytes < MAX_FRAME / 2
                        })
                        .count();
                    entries.truncate(fits.max(1));
                    Response::Changes(entries.iter().map(WireEntry::from).collect())
                }
                Request::ChunksOf { content, .. } => Response::Chunks(
                    source
                        .chunks_of(&Hash(content))?
                        .iter()
                        .map(WireChunk::from)
                        .collect(),
                ),
                Request::ReadChunks { wanted, .. } => {
                    let mut answers = Vec::with_capacity(wanted.len());
                    // Chunks of one file are asked for together: served together.
                    for same_file in
                        wanted.chunk_by(|a, b| (&a.path, a.content) == (&b.path, b.content))
                    {
                        let (path, content) = (&same_file[0].path, Hash(same_file[0].content));
                        let chunks = same_file
                            .iter()
                            .map(|wanted| wanted.chunk.checked())
                            .collect::<Result<Vec<_>>>()?;
                        let served = source.serve_chunks(path, &content, &chunks)?;
                        if served.iter().any(Option::is_none) {
                            // The history says this folder holds the content; the
                            // disk does not. A change the watcher missed (or has
                            // not synced yet): a rescan records it and the peer
                            // hears of it.
                            tracing::debug!(
                                "folder {}: {path:?} no longer holds a chunk a peer asked for; rescanning",
                                folder.id
                            );
                            self.files_changed(&[folder.path.join(path)], false);
                        }
                        answers.extend(served.into_iter().map(|bytes| bytes.map(ByteBuf::from)));
                    }
                    Response::ChunkData(answers)
                }
            })
        };
        answer().unwrap_or_else(|e| {
            tracing::warn!("answering {peer}: {e}");
            Response::Refused(e.to_string())
        })
    }

    fn changed(&self, peer: &PeerId, folder: &str, seq: u64) {
        if let (Some(known), Some(_)) = (self.known_peer(peer), self.shared_folder(peer, folder)) {
            // The greatest: news is handled on blocking threads, maybe out of order.
            self.folder_status(folder, |status| {
                let announced = status.announced.entry(known.name).or_default();
                *announced = seq.max(*announced);
            });
        }
        self.wake_up();
    }
}

/// Bytes read from a peer's socket at once: TLS alone asks for a record
/// (16 KiB) at a time, 70,000 system calls per GiB received. With this buffer
/// and `TLS_SEND_BUFFER` (measured together), the receiving daemon's CPU on a
/// large first sync fell by a sixth.
const SOCKET_READ_BUFFER: usize = 256 << 10;
/// Bytes a connection encrypts before it writes them to the socket (rustls's
/// default: 64 KiB), so that a reply of chunks leaves in one system call.
const TLS_SEND_BUFFER: usize = 2 * CHUNK_BYTES_PER_BATCH;

async fn accept_loop(daemon: Arc<Daemon>, listener: TcpListener) {
    let acceptor = match tls::server_config(&daemon.identity, Arc::clone(&daemon.allowed)) {
        Ok(config) => tokio_rustls::TlsAcceptor::from(config),
        Err(e) => {
            tracing::error!("cannot accept connections: {e}");
            return;
        }
    };
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (daemon, acceptor) = (Arc::clone(&daemon), acceptor.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tcp = BufReader::with_capacity(SOCKET_READ_BUFFER, tcp);
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(mut tls)) => {
                        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
                        tls
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("{from}: refused: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let Ok(peer) = tls::peer_of(tls.get_ref().1.peer_certificates()) else {
                return;
            };
            serve_connection(daemon, tls, peer, from).await;
        });
    }
}

async fn serve_connection<S>(daemon: Arc<Daemon>, stream: S, peer: PeerId, from: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let hello = daemon.hello_for(&peer);
    let up = {
        let daemon = Arc::clone(&daemon);
        move |connection| daemon.add_connection(connection)
    };
    let handler: Arc<dyn RequestHandler> = Arc::clone(&daemon) as Arc<dyn RequestHandler>;
    match conn::run(stream, peer, hello, handler, up).await {
        Ok(()) => tracing::info!("{from}: peer {peer} disconnected"),
        Err(e) => tracing::warn!("{from}: peer {peer} disconnected: {e}"),
    }
    let still = daemon.is_connected(&peer);
    daemon.peer_status(&peer, still);
}

/// Keeps a connection to `peer` open, trying its addresses (configured and
/// announced over XMPP) in turn with a backoff; new announced addresses are
/// tried at once.
async fn dial_loop(daemon: Arc<Daemon>, peer: PeerId) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(500);
    let mut backoff = FIRST_BACKOFF;
    while !daemon.stop.load(Ordering::Relaxed) {
        let known = daemon
            .allowed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer);
        if !known {
            daemon
                .dialing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
            return;
        }
        let addrs_changed = daemon.addrs_changed.notified();
        if daemon.is_connected(&peer) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        for addr in daemon.addrs_of(&peer) {
            match dial(&daemon, peer, &addr).await {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(e) => tracing::debug!("{addr}: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(MAX_BACKOFF),
            _ = addrs_changed => backoff = FIRST_BACKOFF,
        }
    }
}

/// Connects to `peer` at `addr` and serves the connection until it closes.
async fn dial(daemon: &Arc<Daemon>, peer: PeerId, addr: &str) -> Result<()> {
    let config = tls::client_config(&daemon.identity, peer)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Peer(format!("{addr}: connect timed out")))?
        .map_err(|e| Error::Peer(format!("{addr}: {e}")))?;
    let from = tcp.peer_addr().map_err(|e| Error::Peer(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(tls::SERVER_NAME).map_err(|e| Error::Peer(e.to_string()))?;
    let tcp = BufReader::with_capacity(SOCKET_READ_BUFFER, tcp);
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| Error::Peer(format!("{addr}: TLS handshake timed out")))?
        .map_err(|e| {
            // Someone listens there but is not this peer (or does not know us):
            // worth a warning, unlike a closed port.
            tracing::warn!("{addr}: TLS handshake with peer {peer} failed: {e}");
            Error::Peer(format!("{addr}: {e}"))
        })?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    serve_connection(Arc::clone(daemon), tls, peer, from).await;
    Ok(())
}

/// How long the watcher's thread reads events between pauses, and how long it
/// pauses (see `watch`).
const WATCH_AWAKE: Duration = Duration::from_millis(5);
const WATCH_PAUSE: Duration = Duration::from_millis(20);

/// The watcher thread's pauses (see `watch`), cut short while the sync loop
/// waits for that thread (see `Daemon::watcher_caught_up`).
#[derive(Default)]
struct WatcherPause {
    awaited: Mutex<bool>,
    cut_short: Condvar,
}

impl WatcherPause {
    fn pause(&self) {
        let awaited = self.awaited.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .cut_short
            .wait_timeout_while(awaited, WATCH_PAUSE, |awaited| !*awaited);
    }

    fn set_awaited(&self, awaited: bool) {
        *self.awaited.lock().unwrap_or_else(|p| p.into_inner()) = awaited;
        self.cut_short.notify_all();
    }
}

/// Watches every folder, and the share list (`device.db`): a warning if the
/// watcher cannot start, then only the periodic rescans find local changes.
fn watch(daemon: &Arc<Daemon>, handle: Handle) {
    let weak = Arc::downgrade(daemon);
    let data_dir = daemon.data_dir.clone();
    let take_event = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Reads (ours included: a scan opens every directory) change nothing.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        tracing::trace!("watched: {event:?}");
        let Some(daemon) = weak.upgrade() else {
            return;
        };
        if event.paths.iter().any(|p| p.parent() == Some(&data_dir)) {
            // `latus peer` or `latus folder` changed the share list: apply it now.
            // The daemon's own files there (status, logs) are not news.
            let shares_changed = event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    n.as_encoded_bytes()
                        .starts_with(crate::shares::DB_FILE.as_bytes())
                })
            });
            if shares_changed {
                daemon.reload_shares_now(&handle);
                daemon.wake_up();
            }
            if matches!(event.kind, notify::EventKind::Create(_)) {
                for path in &event.paths {
                    daemon.read_wait_mark(path);
                }
            }
            return;
        }
        // Latus's own bookkeeping is not a change to sync. (Compared as bytes:
        // this runs for every event, and a path's components are costly to walk.)
        let ours = |p: &PathBuf| {
            let bytes = p.as_os_str().as_encoded_bytes();
            let mut names = bytes.split(|&b| b == b'/');
            names.any(|name| name == crate::folder::MARKER_DIR.as_bytes())
                || bytes
                    .rsplit(|&b| b == b'/')
                    .next()
                    .is_some_and(|name| name.starts_with(crate::folder::TEMP_PREFIX.as_bytes()))
        };
        let changed: Vec<PathBuf> = event.paths.iter().filter(|p| !ours(p)).cloned().collect();
        if !changed.is_empty() || event.need_rescan() {
            daemon.files_changed(&changed, event.need_rescan());
        }
    };
    // Every event the kernel queues while this thread waits for one wakes it: a
    // burst (a merge placing thousands of files here) cost as many wakeups, a
    // fifth of the placing thread's time. Pausing a little after an event, at
    // most every few milliseconds, lets the rest of a burst pile up and be read
    // in batches. The event itself is handled first: the first change after a
    // quiet spell is not delayed, and the sync loop waiting for this thread
    // (see `watcher_caught_up`) is not kept waiting.
    let mut last_pause = Instant::now();
    let pause = Arc::clone(&daemon.watcher_pause);
    let handler = move |event: notify::Result<notify::Event>| {
        take_event(event);
        if last_pause.elapsed() >= WATCH_AWAKE {
            pause.pause();
            last_pause = Instant::now();
        }
    };
    // Creations, removals, writes, metadata and renames: not opens and closes,
    // which the daemon's own reads would cause by the thousand.
    let config = notify::Config::default().with_event_kinds(notify::EventKindMask::CORE);
    let mut watcher = match notify::RecommendedWatcher::new(handler, config) {
        Ok(watcher) => watcher,
        Err(e) => {
            tracing::warn!("no file-system watcher ({e}); changes are found by rescans only");
            return;
        }
    };
    match watcher.watch(&daemon.data_dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => daemon.update_status(|status| status.wait_marks = Some(Vec::new())),
        Err(e) => tracing::warn!(
            "{}: not watched ({e}); share-list changes apply at the next round",
            daemon.data_dir.display()
        ),
    }
    *daemon.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
    daemon.watch_folders();
}

/// Syncs every folder, again and again, until the daemon stops.
fn sync_loop(daemon: &Arc<Daemon>, handle: &Handle, options: &ServeOptions) {
    let mut next_full_scan = Instant::now();
    // The folders (by path) scanned whole since the daemon started watching
    // them (or since their last error).
    let mut scanned_whole: HashSet<PathBuf> = HashSet::new();
    let mut woke = Wake::default();
    let mut retry = Retry::default();
    while !daemon.stop.load(Ordering::Relaxed) {
        daemon.reload_shares(handle);
        let folders = daemon
            .folders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // A folder removed (and maybe added again later) is no longer watched:
        // what changed meanwhile is found by a whole scan, and nothing is
        // retried for it.
        scanned_whole.retain(|path| folders.iter().any(|f| f.path == *path));
        retry
            .paths
            .retain(|id, _| folders.iter().any(|f| f.id == *id));
        daemon.update_status(|status| {
            let mut known = std::mem::take(&mut status.folders);
            status.folders = folders
                .iter()
                .map(|f| {
                    let old = known
                        .iter()
                        .position(|k| k.id == f.id)
                        .map(|i| known.swap_remove(i));
                    FolderStatus {
                        id: f.id.clone(),
                        path: f.path.clone(),
                        ..old.unwrap_or_else(|| FolderStatus {
                            state: "idle".into(),
                            ..FolderStatus::default()
                        })
                    }
                })
                .collect();
        });
        // What this round scans was named by events already handled; their
        // new directories must be watched before the scan reads them.
        daemon.watcher_caught_up();
        let full_scan = Instant::now() >= next_full_scan;
        if full_scan {
            next_full_scan = Instant::now() + jittered(options.rescan_interval);
        }
        for folder in folders {
            if daemon.stop.load(Ordering::Relaxed) {
                return;
            }
            // A folder is scanned whole in its first round, at each periodic
            // rescan, and whenever the watcher cannot say what changed in it.
            let watched = daemon
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&folder.path);
            let changed = woke.changed.remove(&folder.path);
            let deferred = retry.paths.remove(&folder.id).unwrap_or_default();
            let rescan = match changed {
                _ if full_scan || !watched || !scanned_whole.contains(&folder.path) => {
                    Changed::Whole
                }
                Some(Changed::Whole) => Changed::Whole,
                Some(Changed::Paths(mut paths)) => {
                    paths.extend(deferred);
                    Changed::Paths(paths)
                }
                None => Changed::Paths(deferred),
            };
            let result = sync_folder(daemon, handle, &folder, options, &rescan);
            match (&result, rescan) {
                (Err(_), _) if daemon.stop.load(Ordering::Relaxed) => return,
                (Err(e), _) => {
                    tracing::warn!("folder {}: {e}", folder.id);
                    // What the failed round was to scan is scanned whole next time.
                    scanned_whole.remove(&folder.path);
                    retry.failed = true;
                }
                (Ok(deferred), rescan) => {
                    if matches!(rescan, Changed::Whole) {
                        scanned_whole.insert(folder.path.clone());
                    }
                    if !deferred.is_empty() {
                        retry.paths.insert(folder.id.clone(), deferred.clone());
                    }
                }
            }
            let seq = published_seq(&daemon.published, &folder.id);
            // Written with the wake state locked: see `files_changed`.
            let wake = daemon.wake.0.lock().unwrap_or_else(|p| p.into_inner());
            daemon.folder_status(&folder.id, |status| {
                status.state = "idle".into();
                (status.files_left, status.bytes_left) = (0, 0);
                status.last_error = result.as_ref().err().map(ToString::to_string);
                if result.is_ok() {
                    status.last_synced = Some(unix_seconds());
                }
                status.seq = seq;
                status.waiting = wake.changed.contains_key(&folder.path);
            });
            drop(wake);
        }
        let retry_at = retry.schedule();
        woke = daemon.wait(
            options,
            retry_at.map_or(next_full_scan, |at| at.min(next_full_scan)),
        );
    }
}

/// Retries of what a round could not finish: the paths the merger deferred
/// (changed on disk since their scan, or content no peer could send) are
/// rescanned, so that the rules decide again, and a failed round is run again.
/// The watcher or a peer usually wakes the folder first; this is for when
/// neither does (a file written through a memory map, a disk that was full).
struct Retry {
    /// The deferred paths of each folder (by id).
    paths: HashMap<String, BTreeSet<String>>,
    /// Whether a round of some folder failed since the last `schedule`.
    failed: bool,
    /// The wait before the next retry: doubled while retries keep failing.
    delay: Duration,
}

/// The first wait before a retry, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl Default for Retry {
    fn default() -> Self {
        Retry {
            paths: HashMap::new(),
            failed: false,
            delay: RETRY_FIRST,
        }
    }
}

impl Retry {
    /// When the next round must run at the latest, if anything is to be retried.
    fn schedule(&mut self) -> Option<Instant> {
        if self.paths.is_empty() && !std::mem::take(&mut self.failed) {
            self.delay = RETRY_FIRST;
            return None;
        }
        let at = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(RETRY_MAX);
        Some(at)
    }
}

/// `path` relative to `root` (`""` for `root` itself) if it is `root` or under
/// it; `Some(None)` for a name that is not UTF-8. Compared as bytes, which is
/// enough for the watcher's paths (`root` joined with names) and far cheaper
/// than walking components for every event.
fn relative_under(root: &Path, path: &Path) -> Option<Option<String>> {
    let root = root.as_os_str().as_encoded_bytes();
    let rest = path.as_os_str().as_encoded_bytes().strip_prefix(root)?;
    let rest = match rest.strip_prefix(b"/") {
        Some(rest) => rest,
        None if rest.is_empty() || root.ends_with(b"/") => rest,
        None => return None,
    };
    Some(std::str::from_utf8(rest).ok().map(str::to_string))
}

/// `interval` give or take a tenth, so that devices started together do not
/// all rescan at once.
fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    interval.mul_f64(0.9 + 0.2 * f64::from(nanos) / 1e9)
}

/// Files built at once from a peer: each build mostly waits for the network, so
/// more of them than cores keep the connection full.
const NETWORK_BUILD_THREADS: usize = 8;

/// One round for one folder: scan, then take what each connected peer changed.
/// Returns the paths the merger deferred.
fn sync_folder(
    daemon: &Arc<Daemon>,
    handle: &Handle,
    shared: &SharedFolder,
    options: &ServeOptions,
    rescan: &Changed,
) -> Result<BTreeSet<String>> {
    let folder = Folder::open_or_create(&shared.path)?;
    let _lock = folder.lock()?;
    // The trash policy, with each whole scan: when the daemon starts, then at
    // every periodic rescan. A trash that cannot be emptied stops no sync.
    if matches!(rescan, Changed::Whole)
        && let Err(e) = trash::purge(&folder, options.sync.trash_keep_days)
    {
        tracing::warn!("folder {}: emptying the trash: {e}", shared.id);
    }
    let mut store = HistoryStore::open(&folder.history_path())?;
    let replica = store.replica_id()?;
    daemon
        .replicas
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(shared.id.clone(), replica);
    let before = store.last_seq()?;
    daemon.folder_status(&shared.id, |status| status.state = "scanning".into());
    // During a folder's first scan peers hear of each committed batch: they
    // sync while a long first scan goes on.
    let announce = Announce {
        daemon: Arc::clone(daemon),
        folder: shared.clone(),
    };
    let scan_options = ScanOptions {
        observer: (before == 0).then(|| Arc::new(announce) as Arc<dyn scan::ScanObserver>),
        only: match rescan {
            Changed::Whole => None,
            Changed::Paths(paths) => Some(paths.iter().cloned().collect()),
        },
        // Big files are hashed at a lower priority: serving peers what is
        // already hashed goes first, and the hashing fills the time it leaves.
        background: true,
        stop: Some(Arc::clone(&daemon.stop)),
        // The device's `[scan]` settings (read limit, threads).
        ..options.sync.scan.clone()
    };
    // Woken by a peer with nothing changed here: no scan. The merger still
    // checks each path on disk right before it replaces it.
    if scan_options
        .only
        .as_ref()
        .is_none_or(|paths| !paths.is_empty())
    {
        scan::scan(&folder, &mut store, replica, &scan_options)?;
    }
    let connections = daemon.connections_for(shared);
    let mut deferred = BTreeSet::new();
    for connection in &connections {
        let Some(replica) = connection.folders.get(&shared.id).copied() else {
            continue;
        };
        // Those connected at each request: a peer that connects during a long
        // transfer is asked for chunks too.
        let others: OtherPeers = {
            let (daemon, shared) = (Arc::clone(daemon), shared.clone());
            Box::new(move || daemon.connections_for(&shared))
        };
        let remote = RemoteFolder::new(
            Arc::clone(connection),
            others,
            shared.id.clone(),
            replica,
            handle.clone(),
            daemon.wrong_chunks.clone(),
        );
        local_sync::exchange_with(&mut store, &remote, None)?;
        let received = store.remote_state(&replica)?.map_or(0, |(seq, _)| seq);
        let name_of = |peer: &PeerId| {
            daemon
                .known_peer(peer)
                .map_or_else(|| peer.short(), |known| known.name)
        };
        let peer_name = name_of(&connection.peer);
        // Everything received from the peer is applied (or older than what is
        // here): the next plans need only look at paths changed since.
        let caught_up = |daemon: &Daemon, store: &mut HistoryStore| -> Result<()> {
            store.mark_identical(&replica)?;
            daemon.folder_status(&shared.id, |status| {
                status.applied.insert(peer_name.clone(), received);
            });
            Ok(())
        };
        let plan = diff::plan(&store, &replica)?;
        if plan.is_empty() {
            caught_up(daemon, &mut store)?;
            continue;
        }
        if !options.sync.allow_mass_delete {
            local_sync::check_mass_delete(&folder, &store, &plan, &options.sync)?;
        }
        let progress = Arc::new(SyncProgress::start(daemon, &shared.id, &plan));
        let over_network = MergeOptions {
            resumable: true,
            build_threads: NETWORK_BUILD_THREADS,
            observer: Some(Arc::clone(&progress) as Arc<dyn merge::MergeObserver>),
            ..MergeOptions::default()
        };
        let merged = merge::apply(&folder, &mut store, &remote, plan, &over_network)?;
        let conflicts = merged.conflicts.len();
        daemon.folder_status(&shared.id, |status| status.conflicts += conflicts);
        if merged.deferred.is_empty() && !merged.interrupted {
            caught_up(daemon, &mut store)?;
        }
        deferred.extend(merged.deferred);
        let sources = match &remote.received()[..] {
            [] => String::new(),
            [(peer, _)] => format!(" from {}", name_of(peer)),
            several => {
                let each: Vec<String> = several
                    .iter()
                    .map(|(peer, bytes)| format!("{bytes} from {}", name_of(peer)))
                    .collect();
                format!(" ({})", each.join(", "))
            }
        };
        tracing::info!(
            "folder {}: {} changes from {peer_name}, {} bytes read{sources}, {} bytes resumed",
            shared.id,
            merged.applied,
            merged.bytes_fetched,
            merged.bytes_resumed
        );
    }
    // Every build of the round has finished (they run within `merge::apply`), so
    // no partial file is in use: those no plan needs any more can go.
    match merge::clean_partials(&folder, &store, merge::PARTIAL_MAX_AGE) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            "folder {}: removed {removed} partial files no longer needed",
            shared.id
        ),
        Err(e) => tracing::warn!("folder {}: cleaning partial files: {e}", shared.id),
    }
    let after = store.last_seq()?;
    publish(&daemon.published, &shared.id, after);
    if after != before {
        for connection in daemon.connections_for(shared) {
            connection.notify_changed(&shared.id, after);
        }
        // Also to the peers not connected: they learn they are behind.
        if let Some(xmpp) = &*daemon.xmpp.lock().unwrap_or_else(|p| p.into_inner()) {
            xmpp.send_changed(shared.peers.clone(), &shared.id, after);
        }
    }
    Ok(deferred)
}

/// How often a merge's progress is written to the status file at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// What is left of a round's merge, shown by `latus status`.
struct SyncProgress {
    daemon: Arc<Daemon>,
    folder: String,
    /// Files and bytes left, and when they were last written out.
    left: Mutex<(u64, u64, Instant)>,
}

impl SyncProgress {
    fn start(daemon: &Arc<Daemon>, folder: &str, plan: &diff::Plan) -> Self {
        let files = plan.actions.len() as u64;
        let bytes = plan.actions.iter().map(merge::bytes_to_build).sum();
        daemon.folder_status(folder, |status| {
            status.state = "syncing".into();
            (status.files_left, status.bytes_left) = (files, bytes);
        });
        SyncProgress {
            daemon: Arc::clone(daemon),
            folder: folder.to_string(),
            left: Mutex::new((files, bytes, Instant::now())),
        }
    }
}

impl merge::MergeObserver for SyncProgress {
    fn action_done(&self, bytes: u64) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        left.0 = left.0.saturating_sub(1);
        left.1 = left.1.saturating_sub(bytes);
        if left.2.elapsed() >= PROGRESS_INTERVAL {
            left.2 = Instant::now();
            let (files, bytes) = (left.0, left.1);
            self.daemon.folder_status(&self.folder, |status| {
                (status.files_left, status.bytes_left) = (files, bytes);
            });
        }
    }
}

/// Publishes each batch a first scan commits, and tells the peers connected
/// then (a peer that connects during the scan too: the scan may start first).
struct Announce {
    daemon: Arc<Daemon>,
    folder: SharedFolder,
}

impl scan::ScanObserver for Announce {
    fn batch_committed(&self, _entries: usize, last_seq: u64) {
        publish(&self.daemon.published, &self.folder.id, last_seq);
        for connection in self.daemon.connections_for(&self.folder) {
            connection.notify_changed(&self.folder.id, last_seq);
        }
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status a running daemon wrote; `None` when no daemon runs for this home.
pub fn read_status(home: &Home) -> Result<Option<Status>> {
    let path = home.data_dir.join(STATUS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let status: Status = serde_json::from_str(&text).map_err(|e| Error::DeviceState {
        path: path.clone(),
        reason: format!("unreadable status: {e}"),
    })?;
    // A daemon killed without a chance to clean up leaves its file behind.
    let alive = Path::new("/proc").join(status.pid.to_string()).exists();
    Ok(alive.then_some(status))
}

/// Logs in to the device's XMPP account on a thread of its own; a missing
/// password is reported, and syncing goes on over the configured addresses.
fn start_xmpp(daemon: &Arc<Daemon>, home: &Home, config: XmppConfig, bound: SocketAddr) {
    let set_state = |state: String| {
        daemon.update_status(|status| {
            status.xmpp = Some(XmppStatus {
                jid: config.jid.clone(),
                state,
            })
        })
    };
    let started = (|| {
        let jid = config.check()?;
        let password = xmpp::password(home)?;
        let contacts = contacts_of(&daemon.peers.read().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .filter(|contact| *contact != jid)
            .collect();
        let settings = xmpp::Settings {
            resource: xmpp::resource_for(&daemon.name, &daemon.identity.peer_id()),
            jid,
            password,
            server: config.server.clone(),
            peer: daemon.identity.peer_id(),
            addrs: announced_addrs(bound),
            contacts,
            login_timeout: XMPP_LOGIN_TIMEOUT,
        };
        tracing::info!(
            "xmpp: logging in as {}/{}, announcing {:?}",
            settings.jid,
            settings.resource,
            settings.addrs
        );
        let link = Arc::new(XmppLink(Arc::downgrade(daemon)));
        XmppClient::start(settings, link)
    })();
    match started {
        Ok(client) => {
            set_state(XmppState::Connecting.to_string());
            *daemon.xmpp.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        }
        Err(e) => {
            tracing::error!("xmpp: {e}");
            set_state(e.to_string());
        }
    }
}

/// The XMPP accounts of the peers that belong to other people.
fn contacts_of(peers: &[KnownPeer]) -> Vec<BareJid> {
    peers
        .iter()
        .filter_map(|p| BareJid::new(p.jid.as_deref()?).ok())
        .collect()
}

/// How long the first XMPP login may take before the daemon finds out why not.
const XMPP_LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses peers can dial: the bound one, or every interface's address
/// when bound to all of them (loopback ones only if nothing else).
fn announced_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|interface| interface.ip())
        .filter(|ip| ip.is_ipv4() == bound.is_ipv4() || bound.is_ipv6())
        .collect();
    let outside: Vec<IpAddr> = ips.iter().copied().filter(|ip| !ip.is_loopback()).collect();
    let chosen = if outside.is_empty() { ips } else { outside };
    chosen
        .into_iter()
        .take(xmpp::stanza::MAX_ADDRS)
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect()
}

/// What the XMPP client reports to the daemon (weak: the client's thread must
/// not keep the daemon alive).
struct XmppLink(Weak<Daemon>);

impl XmppEvents for XmppLink {
    fn state(&self, state: XmppState) {
        let Some(daemon) = self.0.upgrade() else {
            return;
        };
        daemon.update_status(|status| {
            if let Some(xmpp) = &mut status.xmpp {
                xmpp.state = state.to_string();
            }
        });
    }

    fn announced(&self, from: &BareJid, own_account: bool, peer: PeerId, addrs: Vec<SocketAddr>) {
        let Some(daemon) = self.0.upgrade() else {
            return;
        };
        let Some(known) = daemon.known_peer(&peer) else {
            tracing::warn!(
                "xmpp: {from} announced peer {peer}, which is not a known peer; ignored"
            );
            return;
        };
        if !own_account && known.jid.as_deref() != Some(from.as_str()) {
            tracing::warn!(
                "xmpp: {from} announced peer {peer}, which is not that contact's device; ignored"
            );
            return;
        }
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let previous = daemon
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, addrs.clone());
        if previous.as_ref() == Some(&addrs) {
            return;
        }
        tracing::info!("xmpp: peer {} ({peer}) announced {addrs:?}", known.name);
        let id = peer.to_string();
        daemon.update_status(|status| {
            if let Some(entry) = status.peers.iter_mut().find(|p| p.id == id) {
                entry.discovered = addrs;
            }
        });
        daemon.addrs_changed.notify_waiters();
    }

    fn changed(&self, peer: PeerId, folder: &str, seq: u64) {
        let Some(daemon) = self.0.upgrade() else {
            return;
        };
        if daemon.shared_folder(&peer, folder).is_none() {
            tracing::warn!(
                "xmpp: peer {peer} sent news of folder {folder:?}, not shared with it; ignored"
            );
            return;
        }
        let name = daemon
            .known_peer(&peer)
            .map_or_else(|| peer.short(), |p| p.name);
        daemon.folder_status(folder, |status| {
            status.announced.insert(name.clone(), seq);
        });
        if daemon.is_connected(&peer) {
            daemon.wake_up();
        } else {
            tracing::info!(
                "xmpp: peer {name} has folder {folder} up to {seq}, but is not connected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_paths_are_made_relative_to_their_folder_only() {
        let root = Path::new("/srv/music");
        let rel = |p: &str| relative_under(root, Path::new(p));
        assert_eq!(rel("/srv/music/a/b.mp3"), Some(Some("a/b.mp3".into())));
        assert_eq!(rel("/srv/music"), Some(Some(String::new())));
        // A sibling whose name starts like the folder is not in it.
        assert_eq!(rel("/srv/musical/x"), None);
        assert_eq!(rel("/srv"), None);
        let not_utf8 =
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/srv/music/\xff");
        assert_eq!(relative_under(root, Path::new(not_utf8)), Some(None));
        assert_eq!(
            relative_under(Path::new("/"), Path::new("/x/y")),
            Some(Some("x/y".into()))
        );
    }
}
