//! A device for end-to-end tests: its own home and folder ("docs"), the real
//! `latus` binary run against them, and its `latus serve` once started.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const LATUS: &str = env!("CARGO_BIN_EXE_latus");
/// The bound on every wait.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Device {
    pub home: PathBuf,
    pub folder: PathBuf,
    pub daemon: Option<Child>,
    /// Set for the daemon (e.g. `SSL_CERT_FILE`).
    env: Vec<(OsString, OsString)>,
    /// Added to `latus serve`'s arguments.
    serve_args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Device {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (home, folder) = (dir.path().join("home"), dir.path().join("folder"));
        fs::create_dir_all(&folder).unwrap();
        let device = Device {
            home,
            folder,
            daemon: None,
            env: Vec::new(),
            serve_args: Vec::new(),
            _dir: dir,
        };
        device.ok(&["init"]);
        device.ok(&["folder", "add", "docs", device.folder.to_str().unwrap()]);
        device
    }

    /// Adds arguments to the daemon's `latus serve`.
    pub fn serve_args(&mut self, args: &[&str]) {
        self.serve_args.extend(args.iter().map(|a| a.to_string()));
    }

    /// Sets an environment variable for the daemon.
    pub fn daemon_env(&mut self, key: &str, value: impl Into<OsString>) {
        self.env.push((key.into(), value.into()));
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(LATUS)
            .env("LATUS_HOME", &self.home)
            .env_remove("LATUS_LOG")
            .env_remove("LATUS_XMPP_PASSWORD")
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn id(&self) -> String {
        self.ok(&["id"]).trim().to_string()
    }

    /// Knows `other` (at its address when given) and shares the folder with it.
    pub fn trust(&self, other: &Device, addr: Option<&str>) {
        let id = other.id();
        let mut args = vec!["peer", "add", id.as_str()];
        if let Some(addr) = addr {
            args.extend(["--addr", addr]);
        }
        self.ok(&args);
        self.ok(&["folder", "share", "docs", &id]);
    }

    /// Starts `latus serve` on a free loopback port; returns its address. The
    /// log of every run goes to `serve.log`, one after the other.
    pub fn start(&mut self) -> String {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.home.join("serve.log"))
            .unwrap();
        let addr_file = self.home.join(latus::daemon::ADDR_FILE);
        let _ = fs::remove_file(&addr_file);
        // A short delay unless the test sets its own.
        let watch_delay: &[&str] = match self.serve_args.iter().any(|a| a == "--watch-delay") {
            true => &[],
            false => &["--watch-delay", "0.2"],
        };
        let child = Command::new(LATUS)
            .env("LATUS_HOME", &self.home)
            .env_remove("LATUS_XMPP_PASSWORD")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--log-level", "info", "serve", "--listen", "127.0.0.1:0"])
            .args(watch_delay)
            .args(&self.serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let mut addr = String::new();
        wait_for("the daemon to listen", || {
            addr = fs::read_to_string(&addr_file).unwrap_or_default();
            addr.ends_with('\n')
        });
        addr.trim().to_string()
    }

    /// Stops the daemon with SIGTERM and checks that it exits cleanly.
    pub fn stop(&mut self) {
        let mut daemon = self.daemon.take().unwrap();
        let pid = daemon.id() as i32;
        // SAFETY: a signal to the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let start = Instant::now();
        let exit = loop {
            if let Some(exit) = daemon.try_wait().unwrap() {
                break exit;
            }
            assert!(start.elapsed() < WAIT, "the daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{exit:?}");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.home.join("serve.log")).unwrap_or_default()
    }

    /// `latus status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
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

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
