//! A custodian registers and revokes their site's signing keys in the portal: the key
//! `consilium-worker keygen` printed, pasted into the form; a wrong key comes back with its
//! error and what was typed; another site's custodian sees none of it.

use consilium_core::signing::{SigningKey, encode_public_key, key_id};

use crate::harness::Portal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custodian_registers_and_revokes_a_signing_key() {
    let mut p = Portal::start("keys", 0).await;
    p.sign_in("cara@north.example").await;
    p.goto("/access").await;
    p.hydrated().await;
    let section = p.text_of("#site-keys + p + p").await;
    assert!(section.contains("No keys registered"), "{section}");

    // A truncated key: refused, with the reason and the field as typed.
    p.fill("#key-public", "c2hvcnQ=").await;
    p.fill("#key-name", "imaging gateway").await;
    p.press("Register the key").await;
    let page = p.wait_for("public_key", 20).await;
    assert!(
        page.contains("5 bytes where an Ed25519 key has 32"),
        "{page}"
    );
    assert_eq!(
        p.browser
            .find(fantoccini::Locator::Css("#key-name"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("imaging gateway")
    );
    p.shot("refused").await;

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let id = key_id(&key.verifying_key());
    p.fill("#key-public", &encode_public_key(&key.verifying_key()))
        .await;
    p.fill("#key-name", "imaging gateway").await;
    p.press("Register the key").await;
    p.wait_for(&id, 20).await;
    let table = p.text_of("#keys").await;
    assert!(
        table.contains("imaging gateway") && table.contains("in force"),
        "{table}"
    );
    p.shot_at("registered", "#keys").await;

    // South's custodian sees no North key.
    p.sign_out().await;
    p.sign_in("cody@south.example").await;
    p.goto("/access").await;
    let page = p.wait_for("Signing keys of your sites", 10).await;
    assert!(!page.contains(&id), "{page}");

    // Revoked by North's custodian.
    p.sign_out().await;
    p.sign_in("cara@north.example").await;
    p.goto("/access").await;
    p.wait_for(&id, 10).await;
    p.press("Revoke").await;
    p.wait_for("revoked", 20).await;
    let keys = p.text_of("#keys").await;
    assert!(
        keys.contains("revoked") && !keys.contains("in force"),
        "{keys}"
    );
    p.shot_at("revoked", "#keys").await;
    p.close().await;
}
