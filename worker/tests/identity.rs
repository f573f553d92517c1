#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The site's signing key as a hospital's IT makes and keeps it: `consilium-worker keygen`
//! writes a new key readable only by its owner and prints the public half; the worker refuses
//! a key others can read, never overwrites one, and will not run without one.

use consilium_core::signing::{self, parse_public_key};
use consilium_worker::identity;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn worker(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consilium-worker"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server public key, as `consilium admin server-key` prints it.
fn server_key() -> String {
    signing::encode_public_key(&signing::SigningKey::from_bytes(&[5; 32]).verifying_key())
}

/// A configuration with `lines` before the dataset; what `run` says of it.
fn run_with(lines: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("site.key");
    identity::generate(&key).unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"site_id = "00000000-0000-0000-0000-000000000001"
server_url = "http://127.0.0.1:9"
token = "t"
broker_url = "amqp://127.0.0.1:9"
signing_key = "{}"
{lines}
[dataset]
kind = "images"
root = "{}"
labels = "{}/labels.csv"
"#,
            key.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) = worker(&["--config", config.to_str().unwrap(), "run"]);
    (code, err)
}

#[test]
fn the_worker_pins_the_servers_key_and_holds_no_store_credentials() {
    let (code, err) = run_with("");
    assert_eq!(code, 1);
    assert!(
        err.contains("server_public_key is not set") && err.contains("consilium admin server-key"),
        "{err}"
    );
    let (code, err) = run_with(r#"server_public_key = "AAAA""#);
    assert_eq!(code, 1);
    assert!(
        err.contains("server_public_key in") && err.contains("32"),
        "{err}"
    );
    // A site never opens the artifact store: the old setting is refused, with what to do.
    let (code, err) = run_with(&format!(
        "server_public_key = \"{}\"\nartifacts = \"s3://consilium-artifacts\"",
        server_key()
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("`artifacts` is set") && err.contains("through the server"),
        "{err}"
    );
}

#[test]
fn keygen_writes_a_private_key_and_prints_its_public_half() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.key");
    let (code, out, err) = worker(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = identity::load(&path).unwrap();
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .unwrap()
        .trim();
    assert_eq!(parse_public_key(public).unwrap(), key.verifying_key());
    assert!(out.contains(&format!(
        "Key id:     {}",
        signing::key_id(&key.verifying_key())
    )));
    // Never overwritten.
    let (code, _, err) = worker(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("already exists: a site key is never overwritten"),
        "{err}"
    );
    assert_eq!(identity::load(&path).unwrap().to_bytes(), key.to_bytes());
    // Two keys are two different keys (from the operating system's generator).
    let other = identity::generate(&dir.path().join("other.key")).unwrap();
    assert_ne!(other.to_bytes(), key.to_bytes());
}

#[test]
fn a_key_others_can_read_or_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.key");
    identity::generate(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = identity::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("can be read by other users") && err.contains("chmod 600"),
        "{err}"
    );
    let broken = dir.path().join("broken.key");
    std::fs::write(&broken, "# a comment\nnot base64 at all\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = identity::load(&broken).unwrap_err().to_string();
    assert!(err.contains("is not a Consilium site key"), "{err}");
    let err = identity::load(&dir.path().join("missing.key"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("consilium-worker keygen --out"), "{err}");
}

#[test]
fn the_worker_does_not_run_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"site_id = "00000000-0000-0000-0000-000000000001"
server_url = "http://127.0.0.1:9"
token = "t"
broker_url = "amqp://127.0.0.1:9"
server_public_key = "{}"
[dataset]
kind = "images"
root = "{}"
labels = "{}/labels.csv"
"#,
            server_key(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) = worker(&["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("signing_key is not set") && err.contains("consilium-worker keygen"),
        "{err}"
    );
}

#[test]
fn the_worker_does_not_send_updates_unencrypted_across_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("site.key");
    identity::generate(&key).unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"site_id = "00000000-0000-0000-0000-000000000001"
server_url = "https://consilium.example.org"
token = "t"
broker_url = "amqp://site:secret@broker.example.org:5672/%2f"
server_public_key = "{}"
signing_key = "{}"
[dataset]
kind = "images"
root = "{}"
labels = "{}/labels.csv"
"#,
            server_key(),
            key.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) = worker(&["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("broker_url is amqp://broker.example.org") && err.contains("use amqps://"),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "the password is never printed: {err}"
    );
}
