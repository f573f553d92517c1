//! The test OpenID provider (the npm package oidc-provider, `backend/tests/oidc`), started on
//! a loopback port; shared by the API tests and the portal's browser tests.
#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct ProviderProcess {
    child: Child,
    pub issuer: String,
    pub keys: tempfile::TempDir,
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProviderProcess {
    /// The server's OpenID Connect settings for this provider and its one client.
    pub fn settings(&self, redirect: &str) -> consilium_backend::configuration::OidcSettings {
        consilium_backend::configuration::OidcSettings {
            issuer_url: self.issuer.clone(),
            client_id: "consilium".into(),
            client_secret: secrecy::SecretString::from("test-secret-that-is-long-enough"),
            redirect_url: redirect.to_string(),
            roles_claim: "consilium_roles".into(),
            scopes: vec!["openid".into(), "email".into(), "profile".into()],
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn start_provider(redirect_uri: &str) -> ProviderProcess {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    if !dir.join("node_modules/oidc-provider").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(ok.success(), "npm ci in {} failed", dir.display());
    }
    let port = free_port();
    let keys = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new("node")
        .arg("provider.mjs")
        .arg(port.to_string())
        .arg(redirect_uri)
        .arg(keys.path())
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node starts (install Node.js 20+)");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("provider output");
    assert_eq!(line.trim(), "ready", "the OpenID provider did not start");
    ProviderProcess {
        child,
        issuer: format!("http://127.0.0.1:{port}"),
        keys,
    }
}
