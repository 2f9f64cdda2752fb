//! Command-line interface: `latus init`, `id`, `scan`, `log`, `sync`, `trash`,
//! `serve`, `status`, `wait`, `peer`, `folder`, `xmpp`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use latus::daemon::WaitMark;
use latus::device::{Home, PeerId};
use latus::device_sync;
use latus::folder::Folder;
use latus::history::{Entry, HistoryStore, Kind};
use latus::scan::{self, ScanObserver, ScanOptions, ScanSummary};
use latus::shares::Shares;
use latus::sync::{self as local_sync, SyncOptions, SyncReport};
use latus::trash;
use latus::xmpp::XmppConfig;

/// Exit code of a command that failed.
pub const EXIT_ERROR: u8 = 2;
/// Exit code of a sync that created conflict copies (both roots are identical).
const EXIT_CONFLICTS: u8 = 1;

#[derive(Parser)]
#[command(name = "latus", version, about = "Peer-to-peer folder synchronisation")]
pub struct Args {
    /// Directory holding this device's state (identity, config); default: XDG dirs.
    #[arg(long, global = true, env = "LATUS_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(long, global = true, default_value = "info", env = "LATUS_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this device's state (peer id) unless it exists, and print the peer id.
    Init {
        #[arg(long)]
        json: bool,
    },
    /// Record the current state of a folder in its history (creates .latus/ on first use).
    Scan {
        path: PathBuf,
        /// Print one JSON object instead of the text summary.
        #[arg(long)]
        json: bool,
        /// Limit reading for hashing to this many MB/s (0: no limit).
        #[arg(long, value_name = "MBPS")]
        max_read_mbps: Option<f64>,
        /// Hashing threads (default: twice the number of cores, at least 8).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// Show a folder's history, newest first: of one file, or of the whole folder.
    Log {
        path: PathBuf,
        /// A path inside the folder (relative to it, or absolute).
        file: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Show at most N entries.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Sync two folders on this machine both ways. Exit status: 0 identical,
    /// 1 identical with conflict copies created, 2 error.
    Sync {
        a: PathBuf,
        b: PathBuf,
        /// B is a dumb device (a music player, a USB stick; FAT semantics): it is
        /// never hashed, only compared by size and mtime with what Latus wrote there.
        #[arg(long)]
        device: bool,
        /// With --device: B mirrors A; changes made on B are not brought back
        /// (what they replaced or removed goes to B's .latus/trash/).
        #[arg(long, requires = "device")]
        one_way: bool,
        /// Print the plan (one line per action) and change no file.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Go on even when more than half of a folder's files would be deleted.
        #[arg(long)]
        allow_mass_delete: bool,
        /// Limit reading for hashing to this many MB/s (0: no limit).
        #[arg(long, value_name = "MBPS")]
        max_read_mbps: Option<f64>,
        /// Hashing threads (default: twice the number of cores, at least 8).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// The versions a sync replaced or deleted, kept in the folder's .latus/trash/.
    Trash {
        #[command(subcommand)]
        command: TrashCommand,
    },
    /// Keep this device's folders in sync with its peers, continuously, until
    /// Ctrl-C or SIGTERM (listens for known peers and dials those with addresses).
    Serve {
        /// Address to listen on; port 0 picks a free port (written to serve.addr
        /// in the data directory).
        #[arg(long, value_name = "HOST:PORT", default_value = latus::daemon::DEFAULT_LISTEN)]
        listen: String,
        /// Seconds between two full rescans of each folder (the watcher finds
        /// changes in between).
        #[arg(long, value_name = "SECONDS", default_value_t = 3600.0)]
        rescan_interval: f64,
        /// Seconds that changes on disk must be quiet before they are synced.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        watch_delay: f64,
        /// Go on even when more than half of a folder's files would be deleted.
        #[arg(long)]
        allow_mass_delete: bool,
    },
    /// What the running `latus serve` is doing: its address, each folder's state,
    /// each peer's connection.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Wait until the running `latus serve` has FOLDER in sync: the changes made
    /// on disk before this command scanned and shown to peers, and what its
    /// connected peers announced applied. Prints how far the folder's history is
    /// shown to peers.
    Wait {
        folder: String,
        /// Only until this device's own changes are scanned and shown to peers.
        #[arg(long, conflicts_with = "applied")]
        scanned: bool,
        /// Only until this device has applied PEER's (id or name) history of the
        /// folder up to SEQ (what `latus wait --scanned` printed there).
        #[arg(long, value_name = "PEER:SEQ")]
        applied: Option<String>,
        /// Give up (exit status 2) after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Print this device's peer id (the hash of its certificate, made by `latus init`).
    Id {
        #[arg(long)]
        json: bool,
    },
    /// The peers this device knows: only they may connect, each pinned by its id.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// The folders this device syncs, and the peers each is shared with.
    Folder {
        #[command(subcommand)]
        command: FolderCommand,
    },
    /// The XMPP account through which `latus serve` finds this user's other
    /// devices (and peers' contacts) without knowing their addresses.
    Xmpp {
        #[command(subcommand)]
        command: XmppCommand,
    },
}

#[derive(Subcommand)]
enum XmppCommand {
    /// Log in as JID (every device of the account uses the same JID, each with a
    /// resource of its own).
    Set {
        /// A bare JID: user@example.org.
        jid: String,
        /// A file holding the password ("-": standard input). It is copied to a
        /// file readable only by you; or give it to `latus serve` in
        /// $LATUS_XMPP_PASSWORD instead.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// The server, HOST:PORT; default: the JID's domain (DNS SRV, port 5222).
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
    },
    /// Show the account (never the password).
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Forget the account and its password.
    Remove,
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Add a peer by its id (as `latus id` prints it on that device), or add a name
    /// or addresses to a known one.
    Add {
        peer_id: String,
        #[arg(long)]
        name: Option<String>,
        /// Where to reach it, HOST:PORT (repeatable).
        #[arg(long = "addr", value_name = "HOST:PORT")]
        addrs: Vec<String>,
        /// The XMPP account of its owner, when it is not yours: that contact's
        /// announcements may then speak for this peer.
        #[arg(long, value_name = "JID")]
        jid: Option<String>,
    },
    /// List the known peers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forget a peer; the folders shared with it are no longer.
    Remove { peer_id: String },
}

#[derive(Subcommand)]
enum FolderCommand {
    /// Add a folder: FOLDER_ID names it on every device of the group, PATH is
    /// where it is on this one.
    Add { folder_id: String, path: PathBuf },
    /// Share a folder with a known peer: it may then see and change it.
    Share { folder_id: String, peer_id: String },
    /// Stop sharing a folder with a peer: it may no longer see or change it.
    Unshare { folder_id: String, peer_id: String },
    /// Stop syncing a folder. Its files, and its history in .latus/, stay where
    /// they are: added again, it takes up where it stopped.
    Remove { folder_id: String },
    /// List the folders and the peers each is shared with.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrashCommand {
    /// List trashed versions, newest first.
    List {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put a trashed version back at its place (what is there now goes to the trash).
    Restore {
        path: PathBuf,
        /// The file's path inside the folder, as `trash list` shows it.
        file: String,
        /// The version trashed at this time (the `trashed_at_ns` of `trash list --json`);
        /// default: the newest.
        #[arg(long, value_name = "NS")]
        at: Option<i64>,
    },
}

/// Sets up logging to stderr and, for `latus serve`, to rotating files in the
/// data directory as well; `--log-level` filters both. The guard flushes the file
/// log when dropped: keep it until the command has returned.
pub fn init_logging(args: &Args) -> Option<WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time();
    let (file, guard) = match args.command {
        Command::Serve { .. } => log_file(args.home.as_deref()).unzip(),
        _ => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(console)
        .with(file)
        .init();
    guard
}

/// A layer writing to `<data dir>/logs/latus.log.<date>` (rotated daily, the
/// last few kept; `latus.log` links to the current one), from a background
/// thread. `None`, with a note on stderr, when that cannot be set up: the
/// daemon still runs and logs to stderr.
fn log_file<S>(home: Option<&Path>) -> Option<(impl tracing_subscriber::Layer<S>, WorkerGuard)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let home = Home::locate(home).ok()?;
    // No data dir yet: `latus init` has not run and `serve` is about to say so.
    if !home.data_dir.is_dir() {
        return None;
    }
    let dir = home.data_dir.join(latus::daemon::LOG_DIR);
    let appender = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(latus::daemon::LOG_FILE)
                .latest_symlink(latus::daemon::LOG_FILE)
                .max_log_files(latus::daemon::LOG_FILES_KEPT)
                .build(&dir)
                .map_err(|e| e.to_string())
        });
    let appender = match appender {
        Ok(appender) => appender,
        Err(e) => {
            eprintln!("latus: no log file in {}: {e}", dir.display());
            return None;
        }
    };
    // Not lossy: a daemon's log file should hold every line; at the levels it
    // logs, a write never waits long. The queue's slots are allocated up front:
    // 8,192 lines instead of the default 128,000 keep 4 MiB off the daemon.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(8_192)
        .finish(appender);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false);
    Some((layer, guard))
}

pub fn run(args: Args) -> Result<ExitCode> {
    let home = Home::locate(args.home.as_deref())?;
    match args.command {
        Command::Init { json } => init(&home, json),
        Command::Scan {
            path,
            json,
            max_read_mbps,
            threads,
        } => scan_folder(&home, &path, json, max_read_mbps, threads),
        Command::Log {
            path,
            file,
            json,
            limit,
        } => log(&path, file.as_deref(), json, limit),
        Command::Sync {
            a,
            b,
            device,
            one_way,
            dry_run,
            json,
            allow_mass_delete,
            max_read_mbps,
            threads,
        } => {
            let config = home.config()?;
            let options = SyncOptions {
                dry_run,
                allow_mass_delete,
                scan: scan_options(&config, max_read_mbps, threads)?,
                ..sync_options(&config)
            };
            let target = match (device, one_way) {
                (false, _) => Target::Folder,
                (true, false) => Target::Device,
                (true, true) => Target::DeviceOneWay,
            };
            return sync_folders(&a, &b, target, &options, json);
        }
        Command::Trash { command } => trash_command(command),
        Command::Id { json } => print_id(&home, json),
        Command::Status { json } => print_status(&home, json),
        Command::Wait {
            folder,
            scanned,
            applied,
            timeout,
            json,
        } => {
            let until = match (scanned, applied) {
                (_, Some(applied)) => {
                    let (peer, seq) = applied
                        .rsplit_once(':')
                        .and_then(|(peer, seq)| Some((peer.to_string(), seq.parse().ok()?)))
                        .context("--applied takes PEER:SEQ, e.g. alice-laptop:42")?;
                    InSync::Applied { peer, seq }
                }
                (true, None) => InSync::Scanned,
                (false, None) => InSync::Fully,
            };
            wait_in_sync(&home, &folder, &until, timeout, json)
        }
        Command::Serve {
            listen,
            rescan_interval,
            watch_delay,
            allow_mass_delete,
        } => serve(
            &home,
            listen,
            rescan_interval,
            watch_delay,
            allow_mass_delete,
        ),
        Command::Peer { command } => peer_command(&home, command),
        Command::Folder { command } => folder_command(&home, command),
        Command::Xmpp { command } => xmpp_command(&home, command),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// What `latus sync A B` treats B as.
enum Target {
    Folder,
    Device,
    DeviceOneWay,
}

fn sync_folders(
    a: &Path,
    b: &Path,
    target: Target,
    options: &SyncOptions,
    json: bool,
) -> Result<ExitCode> {
    let report = match target {
        Target::Folder => local_sync::sync(a, b, options),
        Target::Device => device_sync::sync_device(a, b, options, false),
        Target::DeviceOneWay => device_sync::sync_device(a, b, options, true),
    }
    .with_context(|| format!("syncing {} and {}", a.display(), b.display()))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_sync(&report, options.dry_run);
    }
    if options.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    if !report.identical {
        anyhow::bail!(
            "the folders still differ after {} rounds (a file kept changing, or see the warnings above): {}",
            report.rounds,
            report.differences.join(", ")
        );
    }
    Ok(if report.conflicts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CONFLICTS)
    })
}

fn print_sync(report: &SyncReport, dry_run: bool) {
    let label = |root: &Path| if root == report.a.root { "A" } else { "B" };
    println!("A = {}", report.a.root.display());
    println!("B = {}", report.b.root.display());
    if dry_run {
        for action in &report.actions {
            println!("{}: {}", label(&action.root), action.line);
        }
        println!(
            "{} actions planned; nothing was changed",
            report.actions.len()
        );
        return;
    }
    for side in [&report.a, &report.b] {
        println!(
            "{}: {} changes applied, {} copied locally, {} read from the other side",
            label(&side.root),
            side.applied,
            indicatif::HumanBytes(side.bytes_local),
            indicatif::HumanBytes(side.bytes_fetched),
        );
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for conflict in &report.conflicts {
        println!(
            "conflict: {} (the other version is kept as {})",
            conflict.path, conflict.copy_path
        );
    }
    if report.identical {
        println!("in sync");
    }
}

fn trash_command(command: TrashCommand) -> Result<()> {
    match command {
        TrashCommand::List { path, json } => {
            let folder = Folder::open(&path)?;
            let items = trash::list(&folder)?;
            for item in &items {
                if json {
                    println!("{}", serde_json::to_string(item)?);
                } else {
                    println!(
                        "{}  {:>10}  {}",
                        format_time(item.trashed_at_ns),
                        indicatif::HumanBytes(item.size),
                        item.path
                    );
                }
            }
            if !json && items.is_empty() {
                println!("the trash is empty");
            }
        }
        TrashCommand::Restore { path, file, at } => {
            let folder = Folder::open(&path)?;
            let _lock = folder.lock()?;
            let item = trash::restore(&folder, &file, at)?;
            println!(
                "restored {} (trashed {})",
                item.path,
                format_time(item.trashed_at_ns)
            );
        }
    }
    Ok(())
}

fn init(home: &Home, json: bool) -> Result<()> {
    let (id, created) = home.init()?;
    if json {
        let out = serde_json::json!({
            "peer_id": id.to_string(),
            "created": created,
            "config_dir": home.config_dir,
        });
        println!("{out}");
    } else {
        let what = if created { "created" } else { "exists" };
        println!(
            "device {id} ({what}, state in {})",
            home.config_dir.display()
        );
    }
    Ok(())
}

/// The sync settings of `config.toml`, over the defaults.
fn sync_options(config: &latus::device::Config) -> SyncOptions {
    let mut options = SyncOptions::default();
    if let Some(percent) = config.sync.mass_delete_percent {
        options.mass_delete_percent = percent;
    }
    if let Some(files) = config.sync.mass_delete_min_files {
        options.mass_delete_min_files = files;
    }
    if let Some(days) = config.sync.trash_keep_days {
        options.trash_keep_days = days;
    }
    options
}

fn serve(
    home: &Home,
    listen: String,
    rescan_interval: f64,
    watch_delay: f64,
    allow_mass_delete: bool,
) -> Result<()> {
    let seconds = |value: f64, flag: &str| {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "{flag} must be a positive number of seconds"
        );
        Ok(Duration::from_secs_f64(value))
    };
    let config = home.config()?;
    let options = latus::daemon::ServeOptions {
        listen,
        rescan_interval: seconds(rescan_interval, "--rescan-interval")?,
        watch_delay: seconds(watch_delay, "--watch-delay")?,
        sync: SyncOptions {
            allow_mass_delete,
            scan: scan_options(&config, None, None)?,
            ..sync_options(&config)
        },
    };
    latus::daemon::serve(home, options)?;
    Ok(())
}

fn xmpp_command(home: &Home, command: XmppCommand) -> Result<()> {
    match command {
        XmppCommand::Set {
            jid,
            password_file,
            server,
        } => {
            let password = match password_file {
                None => None,
                Some(path) if path.as_os_str() == "-" => {
                    let mut password = String::new();
                    std::io::stdin()
                        .read_line(&mut password)
                        .context("reading the password from standard input")?;
                    Some(password)
                }
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                ),
            };
            let password = password.map(|p| p.trim_end_matches(['\r', '\n']).to_string());
            if password.as_deref() == Some("") {
                anyhow::bail!("the password file is empty");
            }
            let config = XmppConfig { jid, server };
            let jid = config.check()?;
            let config = XmppConfig {
                jid: jid.to_string(),
                ..config
            };
            config.save(home, password.as_deref())?;
            println!("xmpp account {} saved", config.jid);
        }
        XmppCommand::Show { json } => {
            let config = XmppConfig::load(home)?;
            if json {
                println!("{}", serde_json::to_string(&config)?);
            } else if let Some(config) = config {
                let server = config.server.as_deref().unwrap_or("from the JID's domain");
                println!("{}  server: {server}", config.jid);
            } else {
                println!("no xmpp account (set one with `latus xmpp set JID`)");
            }
        }
        XmppCommand::Remove => {
            if XmppConfig::remove(home)? {
                println!("xmpp account removed");
            } else {
                println!("no xmpp account");
            }
        }
    }
    Ok(())
}

fn print_status(home: &Home, json: bool) -> Result<()> {
    let status = latus::daemon::read_status(home)?;
    if json {
        let value = match &status {
            Some(status) => serde_json::json!({ "running": true, "status": status }),
            None => serde_json::json!({ "running": false }),
        };
        println!("{value}");
        return Ok(());
    }
    let Some(status) = status else {
        println!("latus serve is not running (start it with `latus serve`)");
        return Ok(());
    };
    println!("device {}", status.device);
    println!("listening on {} (pid {})", status.listen, status.pid);
    if let Some(xmpp) = &status.xmpp {
        println!("xmpp: {} as {}", xmpp.state, xmpp.jid);
    }
    for folder in &status.folders {
        let mut line = format!(
            "folder {}  {}  {}",
            folder.id,
            folder.path.display(),
            folder.state
        );
        if folder.files_left > 0 {
            line.push_str(&format!(
                ", {} change{} / {} left",
                folder.files_left,
                if folder.files_left == 1 { "" } else { "s" },
                indicatif::HumanBytes(folder.bytes_left)
            ));
        }
        if folder.conflicts > 0 {
            line.push_str(&format!(", {} conflict copies made", folder.conflicts));
        }
        if let Some(error) = &folder.last_error {
            line.push_str(&format!(", last error: {error}"));
        }
        println!("{line}");
    }
    for peer in &status.peers {
        let state = if peer.connected {
            "connected"
        } else {
            "not connected"
        };
        let mut addrs = peer.addrs.clone();
        addrs.extend(peer.discovered.iter().map(|addr| format!("{addr} (xmpp)")));
        println!(
            "peer {} ({})  {state}  {}",
            peer.name,
            peer.id,
            addrs.join(" ")
        );
    }
    Ok(())
}

/// What `latus wait` waits for.
enum InSync {
    Fully,
    Scanned,
    Applied { peer: String, seq: u64 },
}

/// How often `latus wait` reads the daemon's status.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// How long `latus wait` waits for a daemon that is not running (one just started
/// writes its status within this time).
const WAIT_FOR_DAEMON: Duration = Duration::from_secs(5);

fn wait_in_sync(home: &Home, folder: &str, until: &InSync, timeout: f64, json: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs_f64(timeout.max(0.0));
    // A change made on disk just before this command may not be read by the
    // daemon's watcher yet: the answer waits until it has read a mark made after.
    let needs_mark = !matches!(until, InSync::Applied { .. });
    let mut mark = None;
    loop {
        let status = latus::daemon::read_status(home)?;
        if status.is_none() && started.elapsed() >= WAIT_FOR_DAEMON.min(deadline - started) {
            anyhow::bail!("latus serve is not running (start it with `latus serve`)");
        }
        let found = status
            .as_ref()
            .and_then(|status| Some((status, status.folders.iter().find(|f| f.id == folder)?)));
        if let Some((status, found)) = found {
            if needs_mark && mark.is_none() && status.wait_marks.is_some() {
                mark = Some(WaitMark::make(home)?);
            }
            let marked = mark.as_ref().is_none_or(|mark| status.has_read(mark));
            let done = marked
                && match until {
                    InSync::Fully => status.in_sync(found),
                    InSync::Scanned => found.scanned(),
                    InSync::Applied { peer, seq } => status
                        .peers
                        .iter()
                        .find(|p| p.id == *peer || p.name == *peer)
                        .is_some_and(|p| found.has_applied(&p.name, *seq)),
                };
            if done {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "folder": folder, "seq": found.seq })
                    );
                } else {
                    println!("{}", found.seq);
                }
                return Ok(());
            }
        }
        if std::time::Instant::now() >= deadline {
            let why = match found {
                None => "the daemon has no such folder".to_string(),
                Some((status, found)) => match &found.last_error {
                    Some(error) => format!("{}, last error: {error}", found.state),
                    None if mark.as_ref().is_some_and(|mark| !status.has_read(mark)) => {
                        "the daemon's watcher has not read this command's wait mark".into()
                    }
                    None => found.state.clone(),
                },
            };
            anyhow::bail!("folder {folder} not in sync after {timeout} s ({why})");
        }
        std::thread::sleep(WAIT_POLL);
    }
}

fn print_id(home: &Home, json: bool) -> Result<()> {
    let id = home.identity()?.peer_id();
    if json {
        println!("{}", serde_json::json!({ "peer_id": id.to_string() }));
    } else {
        println!("{id}");
    }
    Ok(())
}

fn parse_peer_id(text: &str) -> Result<PeerId> {
    Ok(text.parse::<PeerId>()?)
}

fn peer_command(home: &Home, command: PeerCommand) -> Result<()> {
    let shares = Shares::open(&home.data_dir)?;
    match command {
        PeerCommand::Add {
            peer_id,
            name,
            addrs,
            jid,
        } => {
            let id = parse_peer_id(&peer_id)?;
            anyhow::ensure!(
                home.peer_id()? != Some(id),
                "{id} is this device's own id: add the id another device's `latus id` prints"
            );
            let peer = shares.add_peer(&id, name.as_deref(), &addrs, jid.as_deref())?;
            println!("peer {} ({})", peer.id, peer.name);
        }
        PeerCommand::List { json } => {
            let peers = shares.peers()?;
            if json {
                println!("{}", serde_json::to_string(&peers)?);
            } else {
                for peer in &peers {
                    println!("{}  {}  {}", peer.id, peer.name, peer.addrs.join(" "));
                }
            }
        }
        PeerCommand::Remove { peer_id } => {
            let id = parse_peer_id(&peer_id)?;
            anyhow::ensure!(shares.remove_peer(&id)?, "peer {id} is not known");
            println!("removed peer {id}");
        }
    }
    Ok(())
}

fn folder_command(home: &Home, command: FolderCommand) -> Result<()> {
    let shares = Shares::open(&home.data_dir)?;
    match command {
        FolderCommand::Add { folder_id, path } => {
            let folder = shares.add_folder(&folder_id, &path)?;
            println!("folder {} at {}", folder.id, folder.path.display());
        }
        FolderCommand::Share { folder_id, peer_id } => {
            let id = parse_peer_id(&peer_id)?;
            shares.share(&folder_id, &id)?;
            println!("folder {folder_id} shared with {id}");
        }
        FolderCommand::Unshare { folder_id, peer_id } => {
            let id = parse_peer_id(&peer_id)?;
            anyhow::ensure!(
                shares.unshare(&folder_id, &id)?,
                "folder {folder_id:?} is not shared with {id}"
            );
            println!("folder {folder_id} no longer shared with {id}");
        }
        FolderCommand::Remove { folder_id } => {
            let folder = shares
                .folder(&folder_id)?
                .with_context(|| format!("no folder {folder_id:?}"))?;
            shares.remove_folder(&folder_id)?;
            println!(
                "folder {folder_id} is no longer synced; its files stay in {}",
                folder.path.display()
            );
        }
        FolderCommand::List { json } => {
            let folders = shares.folders()?;
            if json {
                println!("{}", serde_json::to_string(&folders)?);
            } else {
                for folder in &folders {
                    println!("{}  {}", folder.id, folder.path.display());
                    for peer in &folder.peers {
                        println!("  shared with {peer}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn scan_folder(
    home: &Home,
    path: &Path,
    json: bool,
    max_read_mbps: Option<f64>,
    threads: Option<usize>,
) -> Result<()> {
    let config = home.config()?;
    let folder = Folder::open_or_create(path)?;
    let _lock = folder.lock()?;
    let mut store = HistoryStore::open(&folder.history_path())?;
    let replica = store.replica_id()?;
    let mut options = scan_options(&config, max_read_mbps, threads)?;
    let progress = (!json && std::io::stderr().is_terminal()).then(ScanProgress::start);
    if let Some(progress) = &progress {
        options.observer = Some(progress.clone() as Arc<dyn ScanObserver>);
    }
    let summary = scan::scan(&folder, &mut store, replica, &options)
        .with_context(|| format!("scanning {}", folder.root().display()))?;
    if let Some(progress) = progress {
        progress.bar.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn scan_options(
    config: &latus::device::Config,
    max_read_mbps: Option<f64>,
    threads: Option<usize>,
) -> Result<ScanOptions> {
    let mut options = ScanOptions::default();
    if let Some(mbps) = max_read_mbps.or(config.scan.max_read_mbps) {
        anyhow::ensure!(mbps >= 0.0, "--max-read-mbps must not be negative");
        options.max_read_bytes_per_sec = mbps * 1e6;
    }
    if let Some(n) = threads.or(config.scan.hash_threads) {
        options.hash_threads = n.max(1);
    }
    Ok(options)
}

fn print_summary(s: &ScanSummary) {
    println!(
        "{}: {} files, {} dirs, {} symlinks",
        s.root.display(),
        s.files,
        s.dirs,
        s.symlinks
    );
    println!(
        "  {} new, {} changed, {} deleted, {} unchanged, {} skipped",
        s.new, s.changed, s.deleted, s.unchanged, s.skipped
    );
    println!(
        "  hashed {} files, {} in {:.2} s",
        s.files_hashed,
        indicatif::HumanBytes(s.bytes_hashed),
        s.seconds
    );
    if !s.warnings.is_empty() {
        println!("  {} warnings (listed above)", s.warnings.len());
    }
}

/// A spinner with the entries walked and bytes hashed so far, drawn on stderr.
struct ScanProgress {
    bar: ProgressBar,
    bytes_hashed: AtomicU64,
}

impl ScanProgress {
    fn start() -> Arc<Self> {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {pos} entries walked, {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message("0 B hashed");
        bar.enable_steady_tick(Duration::from_millis(100));
        Arc::new(ScanProgress {
            bar,
            bytes_hashed: AtomicU64::new(0),
        })
    }
}

impl ScanObserver for ScanProgress {
    fn bytes_read(&self, _path: &str, bytes: u64) {
        let total = self.bytes_hashed.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.bar
            .set_message(format!("{} hashed", indicatif::HumanBytes(total)));
    }

    fn entry_walked(&self) {
        self.bar.inc(1);
    }
}

/// One history entry as `latus log --json` prints it.
#[derive(Serialize)]
struct LogLine<'a> {
    seq: u64,
    path: &'a str,
    kind: &'static str,
    size: u64,
    mtime_ns: i64,
    mode: String,
    hash: Option<String>,
    link_target: Option<&'a str>,
    peerid: String,
    author_peerid: String,
    author_utime_ns: i64,
    utime_ns: i64,
}

impl<'a> From<&'a Entry> for LogLine<'a> {
    fn from(e: &'a Entry) -> Self {
        LogLine {
            seq: e.seq,
            path: &e.path,
            kind: e.kind.as_str(),
            size: e.size,
            mtime_ns: e.mtime_ns,
            mode: format!("{:o}", e.mode),
            hash: e.hash.map(|h| h.to_hex()),
            link_target: e.link_target.as_deref(),
            peerid: e.peerid.to_string(),
            author_peerid: e.author_peerid.to_string(),
            author_utime_ns: e.author_utime_ns,
            utime_ns: e.utime_ns,
        }
    }
}

/// `file` as a `/`-separated path relative to the folder root.
fn path_in_folder(folder: &Folder, file: &Path) -> Result<String> {
    let relative = if file.is_absolute() {
        let canonical = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
        canonical
            .strip_prefix(folder.root())
            .map(Path::to_path_buf)
            .with_context(|| {
                format!(
                    "{} is not inside {}",
                    file.display(),
                    folder.root().display()
                )
            })?
    } else {
        file.to_path_buf()
    };
    let parts: Vec<&str> = relative
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<_>>()
        .context("the path is not valid UTF-8")?;
    anyhow::ensure!(!parts.is_empty(), "give a path inside the folder");
    anyhow::ensure!(
        !parts.contains(&".."),
        "the path must stay inside the folder"
    );
    Ok(parts.join("/"))
}

fn format_time(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| ns.to_string())
}

fn log(path: &Path, file: Option<&Path>, json: bool, limit: Option<usize>) -> Result<()> {
    let folder = Folder::open(path)?;
    let history_path = folder.history_path();
    anyhow::ensure!(
        history_path.exists(),
        "{} has not been scanned yet (run `latus scan {}`)",
        folder.root().display(),
        path.display()
    );
    let store = HistoryStore::open_read_only(&history_path)?;
    let mut entries = match file {
        Some(file) => store.history(&path_in_folder(&folder, file)?)?,
        None => store.recent(limit.unwrap_or(usize::MAX >> 1))?,
    };
    if let Some(limit) = limit {
        entries.truncate(limit);
    }
    let mut out = std::io::stdout().lock();
    for e in &entries {
        let written = if json {
            serde_json::to_writer(&mut out, &LogLine::from(e))
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
        } else {
            let hash = e.hash.map(|h| h.short()).unwrap_or_default();
            writeln!(
                out,
                "{}  {:<7} {:>10}  {:<12}  {}  {}",
                format_time(e.author_utime_ns),
                e.kind.as_str(),
                match e.kind {
                    Kind::File | Kind::Symlink => indicatif::HumanBytes(e.size).to_string(),
                    Kind::Dir | Kind::Deleted => String::new(),
                },
                hash,
                e.author_peerid.short(),
                e.path
            )
        };
        match written {
            Ok(()) => {}
            // `latus log | head` closes the pipe early: not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
