//! The object-store client: `[store]` settings to an `object_store` S3 client, and where each
//! object goes under `store.url`'s prefix. Credentials come from the settings (the usual
//! `AWS_*` variables) or, without them, from the instance's role; they never leave this client.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStoreExt, RetryConfig};
use secrecy::{ExposeSecret, SecretString};

use crate::config::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store setting: {0}")]
    Config(String),
    #[error("object store: {what}: {source}")]
    Request {
        what: String,
        source: object_store::Error,
    },
}

/// A configured object store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    s3: AmazonS3,
    bucket: String,
    /// Without leading or trailing `/`; may be empty.
    prefix: String,
    config: StoreConfig,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("bucket", &self.inner.bucket)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

/// Each request's time limit; a part of `part_size_bytes` must get through in it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

impl Store {
    /// The store the settings describe, or `None` when `store.url` is unset. No I/O.
    pub fn from_config(
        config: &StoreConfig,
        ca_file: Option<&Path>,
    ) -> Result<Option<Store>, StoreError> {
        let Some(url) = config
            .url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| StoreError::Config("store.url must be `s3://bucket[/prefix]`".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_owned();
        let mut options = ClientOptions::new()
            .with_allow_http(config.allow_http)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(10));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| StoreError::Config(format!("ca_file {}: {e}", ca.display())))?;
            let certs = object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| StoreError::Config(format!("ca_file {}: {e}", ca.display())))?;
            for cert in certs {
                options = options.with_root_certificate(cert);
            }
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: config.retries as usize,
            retry_timeout: Duration::from_secs(180),
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_allow_http(config.allow_http)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        let expose = |s: &Option<SecretString>| {
            s.as_ref()
                .map(|s| s.expose_secret().to_owned())
                .filter(|s| !s.is_empty())
        };
        if let (Some(id), Some(secret)) = (
            expose(&config.access_key_id),
            expose(&config.secret_access_key),
        ) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = expose(&config.session_token) {
                builder = builder.with_token(token);
            }
        }
        let s3 = builder
            .build()
            .map_err(|e| StoreError::Config(format!("store: {e}")))?;
        Ok(Some(Store {
            inner: Arc::new(Inner {
                s3,
                bucket: bucket.to_owned(),
                prefix,
                config: config.clone(),
            }),
        }))
    }

    pub(crate) fn s3(&self) -> &AmazonS3 {
        &self.inner.s3
    }

    /// The `object_store` client itself, with this store's settings (timeouts, retries, TLS,
    /// credentials): for a baseline that moves bytes with no agent logic around it (the
    /// benchmark). Locations are [`Store::location`]s.
    pub fn client(&self) -> &AmazonS3 {
        &self.inner.s3
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn part_size(&self) -> usize {
        self.inner.config.part_size_bytes as usize
    }

    /// The object at `rel` (relative to the prefix).
    pub fn location(&self, rel: &str) -> ObjectPath {
        let full = if self.inner.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.inner.prefix)
        };
        ObjectPath::from(full.as_str())
    }

    /// `s3://bucket/<location>`, as results name objects.
    pub fn url(&self, location: &ObjectPath) -> String {
        format!("s3://{}/{location}", self.inner.bucket)
    }

    /// Writes, reads back and deletes a small object under the prefix: proves the bucket,
    /// endpoint and credentials work (`gryt-agent check`).
    pub async fn probe(&self, name: &str) -> Result<(), StoreError> {
        let location = self.location(&format!("check/{name}"));
        let what = |action: &str| format!("cannot {action} {}", self.url(&location));
        let body = bytes::Bytes::from_static(b"gryt-agent check\n");
        self.inner
            .s3
            .put(&location, body.clone().into())
            .await
            .map_err(|source| StoreError::Request {
                what: what("write"),
                source,
            })?;
        let read = async { self.inner.s3.get(&location).await?.bytes().await };
        let got = read.await.map_err(|source| StoreError::Request {
            what: what("read"),
            source,
        })?;
        if got != body {
            return Err(StoreError::Config(format!(
                "{} read back different bytes",
                self.url(&location)
            )));
        }
        self.inner
            .s3
            .delete(&location)
            .await
            .map_err(|source| StoreError::Request {
                what: what("delete"),
                source,
            })
    }
}

/// The credentials among the settings: secrets to mask wherever output goes.
pub fn secrets(config: &StoreConfig) -> impl Iterator<Item = SecretString> + '_ {
    [
        &config.access_key_id,
        &config.secret_access_key,
        &config.session_token,
    ]
    .into_iter()
    .flatten()
    .filter(|s| !s.expose_secret().is_empty())
    .cloned()
}
