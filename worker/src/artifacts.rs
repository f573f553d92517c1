//! The content-addressed artifact store (object_store): model weights as safetensors named by
//! their SHA-256. A local folder by default, S3-compatible storage by URL.

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("the artifact store location {0:?} is not usable: {1}")]
    Config(String, String),
    #[error("artifact {hash} is not in the store: {reason}")]
    Missing { hash: String, reason: String },
    #[error("artifact {hash} is corrupt: its content hashes to {actual}")]
    Corrupt { hash: String, actual: String },
    #[error("the artifact store failed: {0}")]
    Store(String),
    #[error("{0:?} is not a SHA-256 in hex")]
    BadHash(String),
}

#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    describe: String,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArtifactStore({})", self.describe)
    }
}

fn valid_hash(hash: &str) -> Result<(), ArtifactError> {
    if hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(ArtifactError::BadHash(hash.to_string()))
    }
}

impl ArtifactStore {
    /// `s3://bucket[/prefix]` (credentials, region and endpoint from the usual `AWS_*`
    /// variables, e.g. `AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for MinIO), or a local folder
    /// (`file:///path` or a plain path), created when missing.
    pub fn open(location: &str) -> Result<Self, ArtifactError> {
        let fail = |e: String| ArtifactError::Config(location.to_string(), e);
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            };
            return Ok(ArtifactStore {
                store,
                describe: location.to_string(),
            });
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        std::fs::create_dir_all(path).map_err(|e| fail(e.to_string()))?;
        let local = LocalFileSystem::new_with_prefix(path).map_err(|e| fail(e.to_string()))?;
        Ok(ArtifactStore {
            store: Arc::new(local),
            describe: path.to_string(),
        })
    }

    fn key(hash: &str) -> StorePath {
        StorePath::from(format!("sha256/{}/{hash}.safetensors", &hash[..2]))
    }

    /// Stores bytes under their SHA-256 and returns it. Storing the same bytes twice is a no-op.
    pub async fn put(&self, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        let hash = hex::encode(Sha256::digest(&bytes));
        let key = Self::key(&hash);
        if self.store.head(&key).await.is_err() {
            self.store
                .put(&key, PutPayload::from(Bytes::from(bytes)))
                .await
                .map_err(|e| ArtifactError::Store(e.to_string()))?;
        }
        Ok(hash)
    }

    /// The bytes stored under `hash`, checked against it.
    pub async fn get(&self, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        valid_hash(hash)?;
        let got = self
            .store
            .get(&Self::key(hash))
            .await
            .map_err(|e| ArtifactError::Missing {
                hash: hash.to_string(),
                reason: e.to_string(),
            })?;
        let bytes = got
            .bytes()
            .await
            .map_err(|e| ArtifactError::Store(e.to_string()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hash {
            return Err(ArtifactError::Corrupt {
                hash: hash.to_string(),
                actual,
            });
        }
        Ok(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn content_addressed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        let h = store.put(b"weights".to_vec()).await.unwrap();
        assert_eq!(h, consilium_core::hash::sha256_hex(b"weights"));
        assert_eq!(store.put(b"weights".to_vec()).await.unwrap(), h);
        assert_eq!(store.get(&h).await.unwrap(), b"weights");
        // Someone edits the file on disk: the read is refused.
        let file = dir
            .path()
            .join(format!("sha256/{}/{h}.safetensors", &h[..2]));
        std::fs::write(&file, b"tampered").unwrap();
        assert!(matches!(
            store.get(&h).await,
            Err(ArtifactError::Corrupt { .. })
        ));
        assert!(matches!(
            store.get("../../etc/passwd").await,
            Err(ArtifactError::BadHash(_))
        ));
    }
}
