//! Figure 5, artifacts and caches: the agent's store path (`gryt_agent::store::JobStorage`, as
//! the executor calls it around a job's steps) against the raw store, a plain `object_store`
//! PUT or GET of the same bytes through the same client (same timeouts, retries, TLS).
//!
//! It needs an object store: `GRYT_STORE_URL` and the other `[store]` settings when set, else
//! the loopback test store's connection file that `tests/store/garage.sh start` writes. With
//! neither, the figure fails saying so (before any other figure runs). Everything it writes is
//! under a prefix of its own, deleted at the end.

use std::os::unix::fs::MetadataExt;

use futures_util::TryStreamExt;
use gryt_agent::config::StoreConfig;
use gryt_agent::store::{JobEnd, JobStorage, Store};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::*;

/// Bytes of each file in the cache of many small files.
pub(crate) const CACHE_FILE: u64 = 16 * 1024;
/// Files per directory in that cache.
const PER_DIR: usize = 64;
/// Rounds of each variant; the figure is the median.
const ROUNDS: usize = 3;

/// The store the figure measures, or why there is none. Called before any figure runs.
pub(crate) async fn bench_store(connection: &Path) -> anyhow::Result<Store> {
    let mut config = Settings::load_from(None, &[], &[])?.store;
    let source = if config.url.is_some() {
        "the store settings (GRYT_STORE_URL)".to_owned()
    } else {
        config = from_connection_file(connection)?;
        format!("the test store of {}", connection.display())
    };
    // A prefix of this run's own under the configured one: deleted at the end.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let base = config.url.take().unwrap_or_default();
    config.url = Some(format!(
        "{}/gryt-bench-{}-{nanos}",
        base.trim_end_matches('/'),
        std::process::id()
    ));
    let store =
        Store::from_config(&config, None)?.with_context(|| format!("{source}: no store.url"))?;
    store
        .probe("bench")
        .await
        .with_context(|| format!("the object store from {source} does not work"))?;
    Ok(store)
}

fn from_connection_file(file: &Path) -> anyhow::Result<StoreConfig> {
    let how = format!(
        "figure `store` needs an object store and none is configured: GRYT_STORE_URL is unset \
         and {} cannot be read. Start the loopback test store with \
         `GARAGE=/path/to/garage bash tests/store/garage.sh start` (it writes that file), or \
         set GRYT_STORE_URL (with GRYT_STORE_ENDPOINT and the AWS_* credentials), or pass \
         --store-env FILE, or run other figures with --only",
        file.display()
    );
    let text = std::fs::read_to_string(file).with_context(|| how.clone())?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("{} has no `{key}=` line", file.display()))
    };
    let endpoint = get("endpoint")?;
    Ok(StoreConfig {
        url: Some(format!("s3://{}", get("bucket")?)),
        allow_http: endpoint.starts_with("http://"),
        endpoint: Some(endpoint),
        region: Some(get("region")?),
        access_key_id: Some(get("access_key_id")?.into()),
        secret_access_key: Some(get("secret_access_key")?.into()),
        ..StoreConfig::default()
    })
}

/// What one run of the agent's path or the raw store's took.
#[derive(Default)]
struct Times {
    agent: Vec<Duration>,
    raw: Vec<Duration>,
}

impl Times {
    fn row(&self, figure: &str, bytes: u64, agent_what: &str, raw_what: &str) -> Row {
        let (agent, raw) = (median(&self.agent), median(&self.raw));
        let rate = |t: Duration| bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6;
        row(
            figure,
            format!("{:.0} MB/s ({}; {agent_what})", rate(agent), secs(agent)),
            format!("{:.0} MB/s ({}; {raw_what})", rate(raw), secs(raw)),
            format!("{:.2}×", ratio(rate(agent), rate(raw))),
            "(context)",
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Bench {
    /// Figure 5: an artifact above the part size, and a cache of many small files saved and
    /// restored, each next to one plain PUT or GET of the same bytes.
    pub(crate) async fn store(&mut self) -> anyhow::Result<Vec<Row>> {
        let store = self
            .store
            .clone()
            .context("figure `store` runs without a store")?;
        let rows = self.store_rows(&store).await;
        let cleaned = clean_up(&store).await;
        let rows = rows?;
        cleaned.context("cannot delete the benchmark's objects")?;
        Ok(rows)
    }

    async fn store_rows(&self, store: &Store) -> anyhow::Result<Vec<Row>> {
        let (a, files) = (self.sizes.a, self.sizes.c);
        let part = store.part_size() as u64;
        if a <= part {
            bail!(
                "the artifact ({} MiB) must be larger than a part ({} MiB)",
                a / MIB,
                part / MIB
            );
        }
        let upload = self.artifact_rounds(store, a).await?;
        let (save, restore, archive) = self.cache_rounds(store, files).await?;
        let cache_bytes = files as u64 * CACHE_FILE;
        Ok(vec![
            upload.row(
                &format!(
                    "5. artifact upload, {} MiB file ({} parts of {} MiB)",
                    a / MIB,
                    a.div_ceil(part),
                    part / MIB
                ),
                a,
                "agent: read, sha256, multipart",
                "one plain PUT from memory",
            ),
            save.row(
                &format!(
                    "5. cache save, {files} files of {} KiB ({:.1} MiB; archive {:.1} MiB)",
                    CACHE_FILE / 1024,
                    cache_bytes as f64 / MIB as f64,
                    archive as f64 / MIB as f64
                ),
                cache_bytes,
                "agent: tar + zstd + upload",
                "one plain PUT of its archive",
            ),
            restore.row(
                "5. cache restore, the same cache into an empty workspace",
                cache_bytes,
                "agent: download + unzstd + untar",
                "one plain GET of its archive",
            ),
        ])
    }

    /// The agent uploads one incompressible file as an artifact; the raw store PUTs the same
    /// bytes from memory. Alternating, ROUNDS times each.
    async fn artifact_rounds(&self, store: &Store, size: u64) -> anyhow::Result<Times> {
        let workspace = self.workspace()?;
        let file = workspace.path().join("big.bin");
        let data = pseudo_random(size, 1);
        std::fs::write(&file, &data)?;
        let sha = Sha256::digest(&data);
        let data = bytes::Bytes::from(data);
        let mut times = Times::default();
        for round in 0..ROUNDS {
            let job = json!({
                "job_id": 1000 + round,
                "artifacts": {"paths": ["big.bin"], "when": "on_success"},
            });
            let mut storage = Storage::before(store, job, workspace.path()).await?;
            let clock = Instant::now();
            let uploaded = storage.after(workspace.path()).await?;
            times.agent.push(clock.elapsed());
            let [artifact] = uploaded.as_slice() else {
                bail!("the agent uploaded {} artifacts, not 1", uploaded.len());
            };
            if artifact.size != size || artifact.sha256 != hex(&sha) {
                bail!("the uploaded artifact differs from the file: {artifact:?}");
            }

            let location = store.location(&format!("raw/artifact-{round}"));
            let clock = Instant::now();
            store
                .client()
                .put(&location, PutPayload::from_bytes(data.clone()))
                .await?;
            times.raw.push(clock.elapsed());
        }
        Ok(times)
    }

    /// The agent saves a cache of `files` small incompressible files (a new key each round),
    /// the raw store GETs the archive it made and PUTs it again, then the agent restores it into
    /// an empty workspace. Returns (save, restore, archive size).
    async fn cache_rounds(
        &self,
        store: &Store,
        files: usize,
    ) -> anyhow::Result<(Times, Times, u64)> {
        let source = self.workspace()?;
        for i in 0..files {
            let dir = source.path().join(format!("deps/d{:03}", i / PER_DIR));
            if i % PER_DIR == 0 {
                std::fs::create_dir_all(&dir)?;
            }
            std::fs::write(
                dir.join(format!("f{i:05}")),
                pseudo_random(CACHE_FILE, i as u64 + 2),
            )?;
        }
        let (mut save, mut restore, mut archive) = (Times::default(), Times::default(), 0);
        for round in 0..ROUNDS {
            let job = json!({
                "job_id": 2000 + round,
                "cache": [{"key": format!("bench-{round}"), "paths": ["deps"]}],
            });
            let mut storage = Storage::before(store, job.clone(), source.path()).await?;
            let clock = Instant::now();
            storage.after(source.path()).await?;
            save.agent.push(clock.elapsed());
            let saved = storage.said("saved")?;
            let name = saved
                .split_whitespace()
                .find(|w| w.ends_with(".tar.zst"))
                .with_context(|| format!("no archive name in: {saved}"))?;
            let scope = gryt_agent::store::spec::cache_scopes(&serde_json::from_value(
                with_pipeline(job.clone()),
            )?)
            .write
            .context("the job may not write caches")?;
            let location = store.location(&format!("cache/{scope}/{name}"));

            let clock = Instant::now();
            let bytes = store.client().get(&location).await?.bytes().await?;
            restore.raw.push(clock.elapsed());
            archive = bytes.len() as u64;
            let copy = store.location(&format!("raw/cache-{round}"));
            let clock = Instant::now();
            store
                .client()
                .put(&copy, PutPayload::from_bytes(bytes))
                .await?;
            save.raw.push(clock.elapsed());

            let target = self.workspace()?;
            let clock = Instant::now();
            let restored = Storage::before(store, job, target.path()).await?;
            restore.agent.push(clock.elapsed());
            restored.said("restored")?;
            let (count, size) = tree_size(&target.path().join("deps"))?;
            if (count, size) != (files, files as u64 * CACHE_FILE) {
                bail!("restored {count} files of {size} bytes, not {files} files");
            }
        }
        Ok((save, restore, archive))
    }

    fn workspace(&self) -> anyhow::Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix("store-")
            .tempdir_in(self.work.path())?)
    }
}

/// A job's `JobStorage` between its two calls, with what it said in the job's log.
struct Storage {
    inner: Option<JobStorage>,
    log: Vec<String>,
}

impl Storage {
    /// `before_steps` for the job `spec` (JSON; a trivial YAML pipeline is added), in
    /// `workspace`, as its owner would run it.
    async fn before(store: &Store, spec: Value, workspace: &Path) -> anyhow::Result<Storage> {
        let job: gryt_agent::wire::JobSpec = serde_json::from_value(with_pipeline(spec))?;
        let pipeline = gryt_agent::pipeline::Pipeline::from_b64(&job.pipeline_b64)?;
        let meta = std::fs::metadata(workspace)?;
        let mut log = Vec::new();
        let storage = JobStorage::before_steps(
            Some(store),
            &job,
            pipeline.storage_wanted(&job),
            workspace,
            (meta.uid(), meta.gid()),
            &JobControl::new(),
            &mut |line: &str| log.push(line.to_owned()),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        Ok(Storage {
            inner: Some(storage),
            log,
        })
    }

    /// `after_steps` of a successful job: its artifacts.
    async fn after(
        &mut self,
        workspace: &Path,
    ) -> anyhow::Result<Vec<gryt_agent::wire::ArtifactResult>> {
        let storage = self.inner.take().context("after_steps twice")?;
        let log = &mut self.log;
        storage
            .after_steps(
                JobEnd::Success,
                workspace,
                &JobControl::new(),
                &mut |line: &str| log.push(line.to_owned()),
            )
            .await
            .map_err(anyhow::Error::msg)
    }

    /// The log line saying `word`, or the whole log in the error.
    fn said(&self, word: &str) -> anyhow::Result<&str> {
        self.log
            .iter()
            .find(|l| l.contains(&format!(": {word} ")))
            .map(String::as_str)
            .with_context(|| format!("the agent's log does not say `{word}`: {:?}", self.log))
    }
}

fn with_pipeline(mut spec: Value) -> Value {
    spec["pipeline_b64"] = json!(b64(TRUE_JOB));
    spec["trusted"] = json!(true);
    spec
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` bytes no compressor shrinks (xorshift), so the archive is as large as the files and the
/// figure is the agent's work, not zstd's ratio on friendly data.
fn pseudo_random(n: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n as usize + 8);
    while (out.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n as usize);
    out
}

/// (files, bytes) beneath `dir`.
fn tree_size(dir: &Path) -> std::io::Result<(usize, u64)> {
    let (mut count, mut size) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let (c, s) = tree_size(&entry.path())?;
            count += c;
            size += s;
        } else {
            count += 1;
            size += entry.metadata()?.len();
        }
    }
    Ok((count, size))
}

/// Deletes every object under the run's prefix.
async fn clean_up(store: &Store) -> anyhow::Result<()> {
    let prefix = store.location("");
    let client = store.client();
    let objects: Vec<ObjectPath> = client
        .list(Some(&prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await?;
    for location in objects {
        client.delete(&location).await?;
    }
    Ok(())
}
