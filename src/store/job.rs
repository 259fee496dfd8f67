//! The two calls the executor makes around a job's steps: [`JobStorage::before_steps`]
//! (validate `artifacts` and `cache`, restore caches) and [`JobStorage::after_steps`] (upload
//! artifacts, save caches). Everything they say goes to the job's log through `log`, which
//! masks it; errors come back as text for the job's result.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::Store;
use super::archive::{self, Owner};
use super::select::{self, open_file_beneath, open_root};
use super::spec::{self, cache_object_name, cache_scopes, hex};
use super::transfer::{self, CHUNK, ChunkReader, ChunkWriter};
use crate::executor::JobControl;
use crate::wire::{ArtifactResult, ArtifactWhen, ArtifactsSpec, CacheSpec, JobSpec};

/// How the steps ended, as far as artifacts and caches care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Success,
    /// A step failed or the job timed out.
    Failure,
    /// Cancelled, aborted, or the agent failed: nothing is uploaded.
    Stopped,
}

/// A job's artifacts and caches between the two calls.
pub struct JobStorage {
    store: Option<Store>,
    job_id: i64,
    artifacts: Option<ArtifactsSpec>,
    caches: Vec<PlannedCache>,
    write_scope: Option<String>,
}

struct PlannedCache {
    spec: CacheSpec,
    /// `<key>-<hash>.tar.zst`, fixed before the steps (they may change the key files).
    name: String,
    /// The job's own scope already holds it: nothing to save.
    in_own_scope: bool,
}

type Log<'a> = &'a mut (dyn FnMut(&str) + Send);

impl JobStorage {
    /// Validates the `artifacts` and `cache` the job wants (see `Pipeline::storage_wanted`) and
    /// restores its caches into `workspace`. A bad field is an error; a cache that cannot be
    /// restored is a miss, said in the log.
    pub async fn before_steps(
        store: Option<&Store>,
        job: &JobSpec,
        wanted: spec::Wanted,
        workspace: &Path,
        user: (u32, u32),
        control: &JobControl,
        log: Log<'_>,
    ) -> Result<Self, String> {
        let spec::Wanted { artifacts, caches } = wanted;
        if let Some(a) = &artifacts {
            spec::check_artifacts(a).map_err(|(f, m)| format!("invalid {f}: {m}"))?;
        }
        spec::check_caches(&caches).map_err(|(f, m)| format!("invalid {f}: {m}"))?;
        let scopes = cache_scopes(job);
        let mut storage = JobStorage {
            store: store.cloned(),
            job_id: job.job_id,
            artifacts,
            caches: Vec::new(),
            write_scope: scopes.write.clone(),
        };
        let Some(store) = store else {
            if storage.artifacts.is_some() || !caches.is_empty() {
                log(
                    "gryt-agent: no object store is configured (store.url): artifacts and caches are off\n",
                );
            }
            return Ok(storage);
        };
        let owner = workspace_owner(workspace, user).await;
        let restoring = restore_all(store, caches, &scopes, workspace, owner, &mut *log);
        let restored = tokio::select! {
            restored = restoring => Some(restored?),
            _ = control.stopped() => None,
        };
        match restored {
            Some(planned) => storage.caches = planned,
            // The steps see the stop too and end the job as cancelled; nothing is saved.
            None => log("gryt-agent: caches: restore stopped\n"),
        }
        Ok(storage)
    }

    /// The storage of a job an earlier agent process started and this one carries on (see
    /// `executor::adopt`): its artifacts are uploaded as usual; its caches are not saved, as
    /// the keys fixed before its steps ran are not known any more.
    pub fn adopted(
        store: Option<&Store>,
        job: &JobSpec,
        wanted: spec::Wanted,
    ) -> Result<Self, String> {
        let spec::Wanted { artifacts, .. } = wanted;
        if let Some(a) = &artifacts {
            spec::check_artifacts(a).map_err(|(f, m)| format!("invalid {f}: {m}"))?;
        }
        Ok(JobStorage {
            store: store.cloned(),
            job_id: job.job_id,
            artifacts,
            caches: Vec::new(),
            write_scope: cache_scopes(job).write,
        })
    }

    /// Uploads the artifacts `when` asks for and saves the caches (after a success, when the
    /// job may write them and the key was new). An artifact that cannot be uploaded is an
    /// error naming it; a cache that cannot be saved is only said in the log.
    pub async fn after_steps(
        self,
        end: JobEnd,
        workspace: &Path,
        control: &JobControl,
        log: Log<'_>,
    ) -> Result<Vec<ArtifactResult>, String> {
        let Some(store) = self.store.clone() else {
            return Ok(Vec::new());
        };
        let work = async {
            let mut uploaded = Vec::new();
            if let Some(artifacts) = &self.artifacts {
                let wanted = match artifacts.when {
                    ArtifactWhen::OnSuccess => end == JobEnd::Success,
                    ArtifactWhen::OnFailure => end == JobEnd::Failure,
                    ArtifactWhen::Always => end != JobEnd::Stopped,
                };
                if wanted {
                    uploaded =
                        upload_artifacts(&store, self.job_id, artifacts, workspace, log).await?;
                }
            }
            if end == JobEnd::Success {
                self.save_caches(&store, workspace, log).await;
            }
            Ok(uploaded)
        };
        tokio::select! {
            result = work => result,
            request = control.stopped() => Err(format!(
                "stopped while uploading artifacts: {}", request.reason
            )),
        }
    }

    async fn save_caches(&self, store: &Store, workspace: &Path, log: Log<'_>) {
        for cache in &self.caches {
            let key = &cache.spec.key;
            let Some(scope) = &self.write_scope else {
                log(&format!(
                    "gryt-agent: cache `{key}`: not saved (only trusted jobs write caches)\n"
                ));
                continue;
            };
            if cache.in_own_scope {
                continue;
            }
            let location = store.location(&format!("cache/{scope}/{}", cache.name));
            match save(store, &location, workspace, &cache.spec.paths).await {
                Ok(size) => log(&format!(
                    "gryt-agent: cache `{key}`: saved {} ({size} bytes)\n",
                    cache.name
                )),
                Err(e) => log(&format!("gryt-agent: cache `{key}`: not saved: {e}\n")),
            }
        }
    }
}

/// Who restored files go to. The agent made the workspace its user's when it could (root);
/// else it is open to all. Read from the workspace (the executor's own record of that is not
/// passed here), off the runtime: a stat can block on a slow disk.
async fn workspace_owner(workspace: &Path, user: (u32, u32)) -> Owner {
    let path = workspace.to_owned();
    let uid = tokio::task::spawn_blocking(move || std::fs::metadata(path).map(|m| m.uid()))
        .await
        .ok()
        .and_then(Result::ok);
    match uid {
        Some(uid) if uid == user.0 => Owner::Chown(user.0, user.1),
        _ => Owner::OpenUp,
    }
}

/// Restores each cache from the first scope that holds it; a failure is a miss, in the log.
async fn restore_all(
    store: &Store,
    caches: Vec<CacheSpec>,
    scopes: &spec::CacheScopes,
    workspace: &Path,
    owner: Owner,
    log: Log<'_>,
) -> Result<Vec<PlannedCache>, String> {
    let mut planned = Vec::new();
    for cache in caches {
        let name = key_name(workspace, &cache).await?;
        let mut in_own_scope = false;
        let mut restored = false;
        for scope in &scopes.read {
            let location = store.location(&format!("cache/{scope}/{name}"));
            match restore(store, &location, workspace, owner).await {
                Ok(None) => continue,
                Ok(Some(bytes)) => {
                    log(&format!(
                        "gryt-agent: cache `{}`: restored {name} ({bytes} bytes)\n",
                        cache.key
                    ));
                    in_own_scope = Some(scope) == scopes.write.as_ref();
                    restored = true;
                    break;
                }
                Err(e) => {
                    log(&format!(
                        "gryt-agent: cache `{}`: cannot restore {name}: {e}\n",
                        cache.key
                    ));
                    break;
                }
            }
        }
        if !restored {
            log(&format!(
                "gryt-agent: cache `{}`: miss ({name})\n",
                cache.key
            ));
        }
        planned.push(PlannedCache {
            spec: cache,
            name,
            in_own_scope,
        });
    }
    Ok(planned)
}

/// The cache's object name, hashing its key files as they are before the steps.
async fn key_name(workspace: &Path, cache: &CacheSpec) -> Result<String, String> {
    let root = workspace.to_owned();
    let files = cache.files.clone();
    let digests = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let selected = select::select(&root, &files)?;
        let root_fd = open_root(&root)?;
        let mut out = Vec::new();
        for (rel, _) in selected.files {
            let mut file = open_file_beneath(&root_fd, &rel)?;
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
            out.push((rel, hash.finalize().into()));
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cache `{}`: cannot read its key files: {e}", cache.key))?;
    Ok(cache_object_name(cache, &digests))
}

/// Restores one archive; `None` when it does not exist.
async fn restore(
    store: &Store,
    location: &object_store::path::Path,
    workspace: &Path,
    owner: Owner,
) -> Result<Option<u64>, String> {
    let limit = store.config().max_cache_bytes;
    let opened = transfer::open(store, location, limit).await;
    let Some(got) = opened.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let root = workspace.to_owned();
    let unpack = tokio::task::spawn_blocking(move || {
        archive::unpack(&root, ChunkReader::new(rx), limit, owner)
    });
    let downloaded = transfer::download(got, tx, limit).await;
    let unpacked = unpack.await.map_err(|e| e.to_string())?;
    downloaded.map_err(|e| e.to_string())?;
    unpacked.map(Some).map_err(|e| e.to_string())
}

/// Packs and uploads one cache; returns the archive's size.
async fn save(
    store: &Store,
    location: &object_store::path::Path,
    workspace: &Path,
    paths: &[String],
) -> Result<u64, String> {
    let limit = store.config().max_cache_bytes;
    let (tx, rx) = mpsc::channel(4);
    let root: PathBuf = workspace.to_owned();
    let paths = paths.to_vec();
    let pack = tokio::task::spawn_blocking(move || {
        let failed = tx.clone();
        if let Err(e) = archive::pack(&root, &paths, ChunkWriter::new(tx), limit) {
            // Sent as an error so the upload is aborted, not completed with half an archive.
            let _ = failed.blocking_send(Err(e));
        }
    });
    let uploaded = transfer::upload(store, location, rx).await;
    pack.await.map_err(|e| e.to_string())?;
    uploaded.map(|u| u.size).map_err(|e| e.to_string())
}

/// Uploads the selected files to `artifacts/<job_id>/<path>`; fails naming the first file that
/// could not be uploaded.
async fn upload_artifacts(
    store: &Store,
    job_id: i64,
    artifacts: &ArtifactsSpec,
    workspace: &Path,
    log: Log<'_>,
) -> Result<Vec<ArtifactResult>, String> {
    let root = workspace.to_owned();
    let patterns = artifacts.paths.clone();
    let selection = tokio::task::spawn_blocking(move || select::select(&root, &patterns))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot select artifacts: {e}"))?;
    for warning in &selection.warnings {
        log(&format!("gryt-agent: artifacts: {warning}\n"));
    }
    let limit = store.config().max_artifact_bytes;
    let total: u64 = selection.files.iter().map(|(_, size)| size).sum();
    if total > limit {
        return Err(format!(
            "artifacts hold {total} bytes, over store.max_artifact_bytes ({limit})"
        ));
    }
    let mut results = Vec::new();
    for (rel, size) in selection.files {
        let location = store.location(&format!("artifacts/{job_id}/{rel}"));
        let (tx, rx) = mpsc::channel(4);
        let root = workspace.to_owned();
        let file = rel.clone();
        let read = tokio::task::spawn_blocking(move || read_file(&root, &file, size, tx));
        let uploaded = transfer::upload(store, &location, rx).await;
        let _ = read.await;
        let uploaded = uploaded.map_err(|e| format!("cannot upload artifact `{rel}`: {e}"))?;
        log(&format!(
            "gryt-agent: artifact {rel} ({} bytes) uploaded\n",
            uploaded.size
        ));
        results.push(ArtifactResult {
            path: rel,
            url: store.url(&location),
            size: uploaded.size,
            sha256: hex(&uploaded.sha256),
        });
    }
    Ok(results)
}

/// Sends the first `size` bytes of the workspace file `rel` as chunks (a file that grew is cut
/// at the size counted against the limit); a read error is sent too, so the upload aborts.
fn read_file(root: &Path, rel: &str, size: u64, tx: mpsc::Sender<std::io::Result<Bytes>>) {
    let opened = open_root(root).and_then(|fd| open_file_beneath(&fd, rel));
    let mut file = match opened {
        Ok(file) => file.take(size),
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    loop {
        let mut buf = vec![0u8; CHUNK];
        match read_full(&mut file, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

fn read_full(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
