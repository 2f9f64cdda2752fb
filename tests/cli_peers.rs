//! End-to-end tests of the device's identity and of `latus peer` / `latus folder`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const LATUS: &str = env!("CARGO_BIN_EXE_latus");

fn latus(home: &Path, args: &[&str]) -> Output {
    Command::new(LATUS)
        .env("LATUS_HOME", home)
        .env_remove("LATUS_LOG")
        .args(args)
        .output()
        .unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = latus(home, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(home: &Path, args: &[&str]) -> String {
    let out = latus(home, args);
    assert_eq!(out.status.code(), Some(2), "{args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn the_peer_id_is_the_certificates_hash_and_stays_the_same() {
    let home = tempfile::tempdir().unwrap();
    let err = fails(home.path(), &["id"]);
    assert!(err.contains("latus init"), "{err}");
    ok(home.path(), &["init"]);
    let id = ok(home.path(), &["id"]).trim().to_string();
    ok(home.path(), &["init"]);
    assert_eq!(ok(home.path(), &["id"]).trim(), id);
    let cert = std::fs::read_to_string(home.path().join("device.crt")).unwrap();
    let der = pem_der(&cert);
    assert_eq!(latus::device::PeerId::of_certificate(&der).to_string(), id);
    let json: Value = serde_json::from_str(&ok(home.path(), &["id", "--json"])).unwrap();
    assert_eq!(json["peer_id"], id.as_str());
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    data_encoding::BASE64.decode(body.as_bytes()).unwrap()
}

#[test]
fn peers_and_folders_are_added_shared_listed_and_removed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ok(a.path(), &["init"]);
    ok(b.path(), &["init"]);
    let id_b = ok(b.path(), &["id"]).trim().to_string();
    ok(
        a.path(),
        &[
            "peer",
            "add",
            &id_b,
            "--name",
            "laptop",
            "--addr",
            "127.0.0.1:22000",
        ],
    );
    let music = tempfile::tempdir().unwrap();
    ok(
        a.path(),
        &["folder", "add", "music", music.path().to_str().unwrap()],
    );
    ok(a.path(), &["folder", "share", "music", &id_b]);

    let peers: Value = serde_json::from_str(&ok(a.path(), &["peer", "list", "--json"])).unwrap();
    assert_eq!(peers[0]["id"], id_b.as_str());
    assert_eq!(peers[0]["name"], "laptop");
    assert_eq!(peers[0]["addrs"][0], "127.0.0.1:22000");
    let folders: Value =
        serde_json::from_str(&ok(a.path(), &["folder", "list", "--json"])).unwrap();
    assert_eq!(folders[0]["id"], "music");
    assert_eq!(folders[0]["peers"][0], id_b.as_str());

    ok(a.path(), &["peer", "remove", &id_b]);
    let folders: Value =
        serde_json::from_str(&ok(a.path(), &["folder", "list", "--json"])).unwrap();
    assert_eq!(folders[0]["peers"].as_array().unwrap().len(), 0);
    let err = fails(a.path(), &["peer", "remove", &id_b]);
    assert!(err.contains("not known"), "{err}");
}

#[test]
fn mistyped_ids_own_ids_and_unknown_names_are_refused() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ok(a.path(), &["init"]);
    ok(b.path(), &["init"]);
    let id_a = ok(a.path(), &["id"]).trim().to_string();
    let id_b = ok(b.path(), &["id"]).trim().to_string();
    let mut typo = id_b.clone().into_bytes();
    typo[3] = if typo[3] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap();
    let err = fails(a.path(), &["peer", "add", &typo]);
    assert!(err.contains("check character"), "{err}");
    let err = fails(a.path(), &["peer", "add", &id_a]);
    assert!(err.contains("own id"), "{err}");
    let err = fails(a.path(), &["peer", "add", &id_b, "--addr", "no-port"]);
    assert!(err.contains("HOST:PORT"), "{err}");
    let err = fails(a.path(), &["folder", "share", "nothing", &id_b]);
    assert!(err.contains("latus folder add"), "{err}");
    let err = fails(
        a.path(),
        &["folder", "add", "../up", a.path().to_str().unwrap()],
    );
    assert!(err.contains("folder id"), "{err}");
    // Nothing was recorded by the refused commands.
    assert_eq!(ok(a.path(), &["peer", "list"]), "");
}
