//! The content-addressed artifact store (object_store): model weights as safetensors named by
//! their SHA-256. A local folder by default, S3-compatible storage by URL. Only the server
//! opens it: a site reaches artifacts through the server (`ServerArtifacts`), which lets it read
//! the global models of the runs it takes part in and write its own outputs, nothing else.

use bytes::Bytes;
use consilium_core::protocol::Job;
use consilium_core::secagg::wire::Stage;
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
    if consilium_core::hash::is_sha256_hex(hash) {
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

/// How a site worker reads the models its jobs name and hands over what it produced.
#[async_trait::async_trait]
pub trait SiteArtifacts: Send + Sync {
    /// A global model `job` names, checked against its SHA-256.
    async fn model(&self, job: &Job, hash: &str) -> Result<Vec<u8>, ArtifactError>;
    /// Hands over this site's output of `job` (an update, a preview set); returns its SHA-256.
    async fn upload(&self, job: &Job, bytes: Vec<u8>) -> Result<String, ArtifactError>;
    /// Secure aggregation: posts this site's part of `stage` of `job`'s round.
    async fn secagg_post(
        &self,
        _job: &Job,
        _stage: Stage,
        _body: serde_json::Value,
    ) -> Result<(), ArtifactError> {
        Err(no_exchange())
    }
    /// Secure aggregation: what `stage` of `job`'s round tells this site once it closed
    /// (`None` while it is open).
    async fn secagg_answer(
        &self,
        _job: &Job,
        _stage: Stage,
    ) -> Result<Option<serde_json::Value>, ArtifactError> {
        Err(no_exchange())
    }
}

fn no_exchange() -> ArtifactError {
    ArtifactError::Store(
        "secure aggregation's exchanges go through the server, and this worker reaches none (set server_url)".into(),
    )
}

/// The store itself, for a worker that is part of the server's own tests of training; a site
/// never holds it. The server refuses results whose outputs it did not receive itself, so
/// results produced through this are never counted by a server.
#[async_trait::async_trait]
impl SiteArtifacts for ArtifactStore {
    async fn model(&self, _job: &Job, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        self.get(hash).await
    }
    async fn upload(&self, _job: &Job, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        self.put(bytes).await
    }
}

/// Artifacts through the server's site endpoints, with the site's worker token:
/// `GET /api/v1/sites/{site}/models/{sha256}` and
/// `PUT /api/v1/sites/{site}/jobs/{job}/output?run_id=…&round=…`. The site holds no store
/// credentials; the server checks every hash.
pub struct ServerArtifacts {
    pub server_url: String,
    /// The site's worker token; never printed.
    pub token: secrecy::SecretString,
    pub http: reqwest::Client,
}

impl ServerArtifacts {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server_url.trim_end_matches('/'))
    }

    /// Sends a request until the server answers, or the job's deadline passes: a server that
    /// restarts or is briefly unreachable costs a pause, not the job. A refusal (4xx) is final.
    async fn send(
        &self,
        job: &Job,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ArtifactError> {
        let mut wait = std::time::Duration::from_millis(250);
        loop {
            let last = match request().send().await {
                Ok(r) if !(r.status().is_server_error() || r.status() == 429) => return Ok(r),
                Ok(r) => format!("the server answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            let next = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            if next >= job.deadline {
                return Err(ArtifactError::Store(format!(
                    "the server could not be reached before the job's deadline: {last}"
                )));
            }
            tracing::warn!(job = %job.job_id, error = %last, "the server is not answering; trying again");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
    }

    /// Which run and round a job's request is about.
    fn job_query(&self, job: &Job) -> [(&'static str, String); 2] {
        [
            ("run_id", job.run_id.to_string()),
            ("round", job.round.to_string()),
        ]
    }

    fn secagg_url(&self, job: &Job, stage: Stage) -> String {
        self.url(&format!(
            "/sites/{}/jobs/{}/secagg/{}",
            job.site_id,
            job.job_id,
            stage.as_str()
        ))
    }

    /// The problem's detail when the server refused, else the status.
    async fn refusal(resp: reqwest::Response) -> String {
        let status = resp.status();
        let detail = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string));
        match detail {
            Some(d) => format!("the server answered {status}: {d}"),
            None => format!("the server answered {status}"),
        }
    }
}

#[async_trait::async_trait]
impl SiteArtifacts for ServerArtifacts {
    async fn model(&self, job: &Job, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        valid_hash(hash)?;
        let url = self.url(&format!("/sites/{}/models/{hash}", job.site_id));
        let missing = |reason: String| ArtifactError::Missing {
            hash: hash.to_string(),
            reason,
        };
        let resp = self
            .send(job, || {
                self.http
                    .get(&url)
                    .bearer_auth(secrecy::ExposeSecret::expose_secret(&self.token))
            })
            .await?;
        if !resp.status().is_success() {
            return Err(missing(Self::refusal(resp).await));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ArtifactError::Store(format!("{url}: {e}")))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hash {
            return Err(ArtifactError::Corrupt {
                hash: hash.to_string(),
                actual,
            });
        }
        Ok(bytes.to_vec())
    }

    async fn secagg_post(
        &self,
        job: &Job,
        stage: Stage,
        body: serde_json::Value,
    ) -> Result<(), ArtifactError> {
        let url = self.secagg_url(job, stage);
        let resp = self
            .send(job, || {
                self.http
                    .post(&url)
                    .query(&self.job_query(job))
                    .bearer_auth(secrecy::ExposeSecret::expose_secret(&self.token))
                    .json(&body)
            })
            .await?;
        if !resp.status().is_success() {
            return Err(ArtifactError::Store(format!(
                "the {} post was not accepted: {}",
                stage.as_str(),
                Self::refusal(resp).await
            )));
        }
        Ok(())
    }

    async fn secagg_answer(
        &self,
        job: &Job,
        stage: Stage,
    ) -> Result<Option<serde_json::Value>, ArtifactError> {
        let url = self.secagg_url(job, stage);
        let resp = self
            .send(job, || {
                self.http
                    .get(&url)
                    .query(&self.job_query(job))
                    .bearer_auth(secrecy::ExposeSecret::expose_secret(&self.token))
            })
            .await?;
        match resp.status() {
            reqwest::StatusCode::ACCEPTED => Ok(None),
            s if s.is_success() => resp
                .json()
                .await
                .map(Some)
                .map_err(|e| ArtifactError::Store(format!("{url}: {e}"))),
            _ => Err(ArtifactError::Store(Self::refusal(resp).await)),
        }
    }

    async fn upload(&self, job: &Job, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        let hash = hex::encode(Sha256::digest(&bytes));
        let url = self.url(&format!(
            "/sites/{}/jobs/{}/output",
            job.site_id, job.job_id
        ));
        let body = Bytes::from(bytes);
        let resp = self
            .send(job, || {
                self.http
                    .put(&url)
                    .query(&self.job_query(job))
                    .bearer_auth(secrecy::ExposeSecret::expose_secret(&self.token))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(ArtifactError::Store(format!(
                "the output of job {} was not accepted: {}",
                job.job_id,
                Self::refusal(resp).await
            )));
        }
        let stored: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| ArtifactError::Store(format!("{url}: {e}")))?;
        // The server hashes what it received: a different hash means the bytes changed on the way.
        match stored.get("sha256").and_then(|h| h.as_str()) {
            Some(h) if h == hash => Ok(hash),
            other => Err(ArtifactError::Corrupt {
                hash,
                actual: other.unwrap_or("(none)").to_string(),
            }),
        }
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
