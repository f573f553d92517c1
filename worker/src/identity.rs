//! The site's signing key: generated here with the operating system's generator, kept in a
//! file only this site's worker may read, never sent anywhere. Its public half is what the
//! site's custodian registers with the server (`consilium-worker keygen` prints it).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use consilium_core::signing::{SigningKey, encode_public_key, key_id};
use std::io::Write;
use std::path::Path;

const HEADER: &str =
    "# Consilium site signing key (Ed25519). Keep it on this machine; never share it.";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{path} already exists: a site key is never overwritten (rotate by writing a new file and registering its public key)"
    )]
    Exists { path: String },
    #[error("cannot write the site key {path}: {reason}")]
    Write { path: String, reason: String },
    #[error(
        "cannot read the site key {path}: {reason}; create one with `consilium-worker keygen --out {path}`"
    )]
    Read { path: String, reason: String },
    #[error(
        "the site key {path} can be read by other users of this machine (mode {mode:o}): `chmod 600 {path}`"
    )]
    Exposed { path: String, mode: u32 },
    #[error("{path} is not a Consilium site key: {reason}")]
    Invalid { path: String, reason: String },
}

/// A new key pair, written to `path` (readable by its owner only); refuses to overwrite.
pub fn generate(path: &Path) -> Result<SigningKey, IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display().to_string();
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::Exists {
                path: shown.clone(),
            },
            _ => IdentityError::Write {
                path: shown.clone(),
                reason: e.to_string(),
            },
        })?;
    writeln!(file, "{HEADER}\n{}", STANDARD.encode(key.to_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(|e| IdentityError::Write {
            path: shown,
            reason: e.to_string(),
        })?;
    Ok(key)
}

/// The key in `path`, refused when other users could read it.
pub fn load(path: &Path) -> Result<SigningKey, IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| IdentityError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|e| IdentityError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let invalid = |reason: &str| IdentityError::Invalid {
        path: shown.clone(),
        reason: reason.to_string(),
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| invalid("it holds no key"))?;
    let bytes = STANDARD
        .decode(line)
        .map_err(|_| invalid("the key is not base64"))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| invalid("the key is not 32 bytes"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// What the custodian registers: the key's id and its public half.
pub fn public_part(key: &SigningKey) -> (String, String) {
    let public = key.verifying_key();
    (key_id(&public), encode_public_key(&public))
}
