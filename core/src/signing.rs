//! Signatures both ways. Every message a site worker sends is signed with its site's Ed25519
//! key, whose public half the site's custodian registered; every job the server sends is signed
//! with the server's key, whose public half each worker pins in its configuration. A signature
//! covers the message's exact bytes (kept as a string in the envelope, never re-serialised), so
//! that anyone holding the public key can check, now or years later, that its holder said
//! exactly this. Each direction signs under its own context, so that a signature over one kind
//! of message can never be passed off as one over another.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::{Job, WorkerMessage};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Prefixed to what is signed, so that a signature over a worker message can never be passed
/// off as one over anything else.
const WORKER_MESSAGE: &[u8] = b"consilium/worker-message/v1\0";
/// Prefixed to what the server signs of a job.
const JOB: &[u8] = b"consilium/job/v1\0";

/// A worker message as it travels: the message's JSON, which key signed it, the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SignedMessage {
    /// The `WorkerMessage` as JSON: exactly the bytes that were signed.
    pub message: String,
    /// The signing key's id (`key_id`), one of the site's registered keys.
    pub key_id: String,
    /// Ed25519 over the worker-message context and `message`, base64.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the public key is not valid: {0}")]
    PublicKey(String),
    #[error("the signature is not valid base64 Ed25519: {0}")]
    Malformed(String),
    #[error("the signature does not verify with key {0}")]
    Mismatch(String),
    #[error("the signed message can't be read: {0}")]
    Message(String),
}

/// A key's id: `ed25519:` and the first 16 hex digits of the SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("ed25519:{}", &hex::encode(digest)[..16])
}

/// The public key as registered: its 32 bytes in base64.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Reads a public key as registered (base64 of 32 bytes), refusing weak keys.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, SignatureError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| SignatureError::PublicKey(format!("not base64 ({e})")))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        SignatureError::PublicKey(format!("{} bytes where an Ed25519 key has 32", b.len()))
    })?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| SignatureError::PublicKey("not a point on the curve".into()))?;
    if key.is_weak() {
        return Err(SignatureError::PublicKey(
            "a weak key (of small order), which anybody could sign for".into(),
        ));
    }
    Ok(key)
}

/// Signs a worker message with the site's key.
pub fn sign(key: &SigningKey, message: &WorkerMessage) -> Result<SignedMessage, serde_json::Error> {
    Ok(sign_text(
        WORKER_MESSAGE,
        key,
        serde_json::to_string(message)?,
    ))
}

/// Checks the signature with `key` (strictly: no malleable signatures) and reads the message.
pub fn verify(key: &VerifyingKey, signed: &SignedMessage) -> Result<WorkerMessage, SignatureError> {
    verify_text(WORKER_MESSAGE, key, signed)?;
    serde_json::from_str(&signed.message).map_err(|e| SignatureError::Message(e.to_string()))
}

/// Signs a job with the server's key.
pub fn sign_job(key: &SigningKey, job: &Job) -> Result<SignedMessage, serde_json::Error> {
    Ok(sign_text(JOB, key, serde_json::to_string(job)?))
}

/// Checks a job's signature with the server's pinned key and reads the job. A job signed with
/// another key is refused before anything in it is read.
pub fn verify_job(key: &VerifyingKey, signed: &SignedMessage) -> Result<Job, SignatureError> {
    if signed.key_id != key_id(key) {
        return Err(SignatureError::Mismatch(format!(
            "{} (the job names key {}, not the server key this worker pins)",
            key_id(key),
            signed.key_id
        )));
    }
    verify_text(JOB, key, signed)?;
    serde_json::from_str(&signed.message).map_err(|e| SignatureError::Message(e.to_string()))
}

/// The message a signed envelope claims to carry, before its signature is checked: only to
/// find whose key to check it with.
pub fn unverified(signed: &SignedMessage) -> Result<WorkerMessage, SignatureError> {
    serde_json::from_str(&signed.message).map_err(|e| SignatureError::Message(e.to_string()))
}

fn sign_text(context: &[u8], key: &SigningKey, message: String) -> SignedMessage {
    let signature = key.sign(&signed_bytes(context, &message));
    SignedMessage {
        key_id: key_id(&key.verifying_key()),
        signature: STANDARD.encode(signature.to_bytes()),
        message,
    }
}

fn verify_text(
    context: &[u8],
    key: &VerifyingKey,
    signed: &SignedMessage,
) -> Result<(), SignatureError> {
    let bytes = STANDARD
        .decode(signed.signature.trim())
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let bytes: [u8; 64] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| SignatureError::Malformed(format!("{} bytes, not 64", b.len())))?;
    key.verify_strict(
        &signed_bytes(context, &signed.message),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| SignatureError::Mismatch(key_id(key)))
}

fn signed_bytes(context: &[u8], message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(context.len() + message.len());
    out.extend_from_slice(context);
    out.extend_from_slice(message.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::{Heartbeat, WorkerState};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn heartbeat() -> WorkerMessage {
        WorkerMessage::Heartbeat(Heartbeat {
            site_id: uuid::Uuid::nil(),
            state: WorkerState::Idle,
            data_summary: "12 images".into(),
            patients: Some(12),
            version: "0.1.0".into(),
            at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        })
    }

    #[test]
    fn a_signed_message_verifies_with_its_key_only() {
        let signed = sign(&key(1), &heartbeat()).unwrap();
        assert_eq!(
            verify(&key(1).verifying_key(), &signed).unwrap(),
            heartbeat()
        );
        assert_eq!(
            verify(&key(2).verifying_key(), &signed),
            Err(SignatureError::Mismatch(key_id(&key(2).verifying_key())))
        );
    }

    #[test]
    fn a_changed_message_does_not_verify() {
        let mut signed = sign(&key(1), &heartbeat()).unwrap();
        signed.message = signed.message.replace("12 images", "13 images");
        assert!(matches!(
            verify(&key(1).verifying_key(), &signed),
            Err(SignatureError::Mismatch(_))
        ));
        signed.signature = "not base64!".into();
        assert!(matches!(
            verify(&key(1).verifying_key(), &signed),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn a_job_verifies_only_with_the_server_key_and_never_as_a_worker_message() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "protocol": 4, "job_id": uuid::Uuid::nil(), "kind": "train", "run_id": uuid::Uuid::nil(),
            "round": 1, "study_id": uuid::Uuid::nil(), "site_id": uuid::Uuid::nil(),
            "plan_hash": "abc", "manifest": {
                "model": {"architecture": "small_cnn", "num_classes": 2},
                "optimiser": {"name": "sgd", "learning_rate": 0.1},
                "local_epochs": 1, "batch_size": 8, "rounds": 1,
                "aggregation": {"strategy": "fedavg"}
            },
            "global_model": null, "deadline": "2026-12-01T00:00:00Z"
        }))
        .unwrap();
        let signed = sign_job(&key(1), &job).unwrap();
        assert_eq!(verify_job(&key(1).verifying_key(), &signed).unwrap(), job);
        let err = verify_job(&key(2).verifying_key(), &signed).unwrap_err();
        assert!(err.to_string().contains("not the server key"), "{err}");
        // Signed by the right key over another context (a site's message): refused.
        let mut relabelled = sign(&key(1), &heartbeat()).unwrap();
        relabelled.message = signed.message.clone();
        assert!(matches!(
            verify_job(&key(1).verifying_key(), &relabelled),
            Err(SignatureError::Mismatch(_))
        ));
        // A job's signature does not make it a worker message either.
        assert!(verify(&key(1).verifying_key(), &signed).is_err());
    }

    #[test]
    fn public_keys_round_trip_and_bad_ones_are_refused() {
        let public = key(7).verifying_key();
        assert_eq!(
            parse_public_key(&encode_public_key(&public)).unwrap(),
            public
        );
        assert!(key_id(&public).starts_with("ed25519:"));
        assert!(parse_public_key("AAAA").is_err());
        // The identity point: of small order, so weak.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let err = parse_public_key(&STANDARD.encode(identity)).unwrap_err();
        assert!(err.to_string().contains("weak"), "{err}");
    }
}
