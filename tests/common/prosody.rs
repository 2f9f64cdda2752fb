//! A real XMPP server for tests: Debian's Prosody, in the foreground, on a free
//! loopback port, with its own data directory and a self-signed certificate
//! for "localhost" (not a CA: rustls refuses a CA certificate as a server's).
//! Clients trust it through `SSL_CERT_FILE` (rustls-native-certs reads it).

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const DOMAIN: &str = "localhost";
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/xmpp/prosody.cfg.lua");

pub struct Prosody {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Prosody {
    /// Starts a server; panics with the reason if Prosody is not installed.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        fs::create_dir_all(&certs).unwrap();
        let (cert, key) = certificate();
        fs::write(certs.join("localhost.crt"), cert).unwrap();
        fs::write(certs.join("localhost.key"), key).unwrap();
        let port = free_port();
        let mut server = Prosody {
            dir,
            port,
            child: None,
        };
        server.run();
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("LATUS_PROSODY_DIR", self.dir.path())
            .env("LATUS_PROSODY_PORT", self.port.to_string())
            .args(["--config", CONFIG]);
        command
    }

    fn run(&mut self) {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("prosody.log"))
            .unwrap();
        let child = self
            .command("prosody")
            .arg("-F")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prosody is not installed (apt-get install -y prosody)");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "prosody did not start listening:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates the account `user@localhost`.
    pub fn register(&self, user: &str, password: &str) {
        let out = self
            .command("prosodyctl")
            .args(["register", user, DOMAIN, password])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prosodyctl register {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The certificate clients must trust (their `SSL_CERT_FILE`): the same for
    /// every server of this test process, which trusts it too.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("certs/localhost.crt")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    /// Kills the server (its clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same accounts.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One certificate (PEM, key PEM) for every server of the test process, whose
/// own XMPP clients trust it through `SSL_CERT_FILE`. Set once, while every
/// test that uses a server waits on this lock, before any client starts.
fn certificate() -> &'static (String, String) {
    static CERT: OnceLock<(String, String)> = OnceLock::new();
    CERT.get_or_init(|| {
        let cert = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).unwrap();
        let pem = (cert.cert.pem(), cert.signing_key.serialize_pem());
        let path = std::env::temp_dir().join(format!("latus-test-xmpp-{}.crt", std::process::id()));
        fs::write(&path, &pem.0).unwrap();
        // SAFETY: no other thread of this process reads the environment now:
        // the tests that need a server wait on this lock, and the others do not
        // run in the XMPP test binaries.
        unsafe { std::env::set_var("SSL_CERT_FILE", &path) };
        pem
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap()
}
