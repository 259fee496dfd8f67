//! The blocking part: one gix clone into the destination, then the worktree checkout.
//!
//! Runs on a blocking thread. Everything that can stop it early goes through one interrupt flag,
//! which gix checks while reading the pack and before writing each file: the caller sets it on
//! timeout, [`Budget`] sets it past the size limit. Connections go only where [`Guard`] allows.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::bstr::BStr;
use gix::credentials::helper::Action;
use gix::credentials::protocol::Outcome;
use gix::protocol::transport::client::blocking_io::http;
use gix::remote::fetch::Shallow;
use secrecy::{ExposeSecret, SecretString};

use super::dest::Dest;
use super::error::{Cause, Step, cause};
use super::limit::{Budget, Limiter, worktree_bytes};
use super::net::Guard;

/// The username GitHub expects with an installation or personal access token.
pub(crate) const TOKEN_USERNAME: &str = "x-access-token";

/// Everything the blocking clone needs, owned so it can move to another thread.
pub(crate) struct Job {
    pub url: String,
    pub branch: String,
    pub commit: Option<String>,
    pub token: Option<SecretString>,
    pub dest: Dest,
    /// Per HTTP request; see `http_options`.
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub interrupt: Arc<AtomicBool>,
    pub budget: Arc<Budget>,
    /// The size limit, also the largest object gix may inflate in memory.
    pub max_bytes: u64,
    /// Where connections may go; `None` for `file://`.
    pub guard: Option<Arc<Guard>>,
}

/// Why the clone failed, still as gix said it; `mod.rs` turns it into a `CheckoutError`.
pub(crate) enum Failure {
    /// A gix error, whether it came from the fetch by commit id (for "commit not found"), and
    /// the step that failed.
    Gix(gix::Error, Stage, Step),
    /// The requested commit is not in what the fallback fetched.
    CommitMissing,
    /// The interrupt flag was set (timeout or size limit); the caller knows which.
    Interrupted,
    /// The extra CA file could not be used.
    CaFile(String),
    /// The destination could not be made ready again.
    Dest(String),
    /// The clone thread panicked (inside gix, on data from the server).
    Panicked(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Branch,
    Commit,
}

/// Clones and checks out; returns the hex id of the commit now in the worktree.
pub(crate) fn run(job: &Job) -> Result<String, Failure> {
    let ca = load_ca(job.ca_file.as_ref())?;
    let id = match &job.commit {
        None => clone(job, &ca, Want::Branch).map_err(|e| e.into_failure(Stage::Branch))?,
        Some(commit) => match clone(job, &ca, Want::Commit(commit)) {
            Ok(id) => id,
            Err(CloneError::Gix(e, step))
                if job.interrupt.load(Ordering::SeqCst)
                    || job.guard.as_ref().is_some_and(|g| g.refusal().is_some())
                    || e.is_resource_exhausted()
                    || matches!(cause(&e), Cause::Auth | Cause::Cancelled) =>
            {
                return Err(Failure::Gix(e, Stage::Commit, step));
            }
            Err(CloneError::TooLarge) => return Err(Failure::Interrupted),
            // Some servers refuse to serve a commit that is no ref tip (upload-pack over a
            // stateful connection without uploadpack.allowReachableSHA1InWant, some hosting
            // services; git's own smart HTTP serves any reachable commit). Then fetch the branch
            // with its whole history and check the commit out if it is on it: a pinned commit
            // is rarely the tip, so depth 1 would not do. The size limit and the timeout still
            // bound that fetch.
            Err(_) => {
                tracing::debug!("fetching the commit by id failed; fetching the branch instead");
                // gix deletes a clone destination it found empty when the clone fails.
                job.dest.reset().map_err(|e| Failure::Dest(e.to_string()))?;
                job.budget.restart();
                clone(job, &ca, Want::CommitOnBranch(commit))
                    .map_err(|e| e.into_failure(Stage::Branch))?
            }
        },
    };
    if job.interrupt.load(Ordering::SeqCst) {
        // gix's checkout returns Ok when interrupted, with part of the files written.
        return Err(Failure::Interrupted);
    }
    Ok(id)
}

enum Want<'a> {
    Branch,
    Commit(&'a str),
    CommitOnBranch(&'a str),
}

enum CloneError {
    Gix(gix::Error, Step),
    CommitMissing,
    /// The worktree would not fit in what is left of the size limit (the budget has tripped).
    TooLarge,
}

impl CloneError {
    fn into_failure(self, stage: Stage) -> Failure {
        match self {
            CloneError::Gix(e, step) => Failure::Gix(e, stage, step),
            CloneError::CommitMissing => Failure::CommitMissing,
            CloneError::TooLarge => Failure::Interrupted,
        }
    }
}

/// Tags a gix error with the step it came from.
fn at(step: Step) -> impl FnOnce(gix::Error) -> CloneError {
    move |e| CloneError::Gix(e, step)
}

fn clone(
    job: &Job,
    ca: &Option<Vec<reqwest::Certificate>>,
    want: Want<'_>,
) -> Result<String, CloneError> {
    // Isolated: no system or user git config, no GIT_* environment. Those could name credential
    // helpers, filter drivers (git-lfs) or proxies that this agent never meant to run or use.
    // No object larger than the size limit is inflated in memory (a small pack can declare a
    // huge blob).
    let open = gix::open::Options::isolated()
        .config_overrides([format!("gitoxide.objects.allocLimit={}", job.max_bytes)]);
    let mut prepare = gix::clone::PrepareFetch::new(
        job.url.as_str(),
        job.dest.path(),
        gix::create::Kind::WithWorktree,
        gix::create::Options::default(),
        open,
    )
    .map_err(at(Step::Prepare))?;
    let token = job.token.clone();
    let guard = job.guard.clone();
    let guarded = guard.is_some();
    let options = http_options(job.request_timeout, ca.clone(), job.guard.clone());
    prepare = prepare.configure_connection(move |connection| {
        let (token, guard) = (token.clone(), guard.clone());
        connection
            .set_credentials(move |action| credentials(action, token.as_ref(), guard.as_deref()));
        let url = connection
            .remote()
            .url(gix::remote::Direction::Fetch)
            .map(|u| u.to_bstring());
        let mut installed = false;
        if let Some(url) = url {
            let repo = connection.remote().repo();
            if let Some(mut defaults) =
                repo.transport_options(<&BStr>::from(url.as_slice()), None)?
            {
                if let Some(http) = defaults.downcast_mut::<http::Options>() {
                    http.backend = Some(options.clone());
                    installed = true;
                }
                connection.set_transport_options(defaults);
            }
        }
        // Without its options the HTTP client would connect anywhere: fail closed.
        if guarded && !installed {
            return Err(gix::Error::from_error(std::io::Error::other(
                "the HTTP client's connection policy could not be installed",
            )));
        }
        Ok(())
    });
    let depth_one = Shallow::DepthAtRemote(NonZeroU32::MIN);
    let fallback_commit = match want {
        Want::Branch => {
            prepare = prepare
                .with_shallow(depth_one)
                .with_ref_name(Some(job.branch.as_str()))
                .map_err(at(Step::Prepare))?;
            None
        }
        Want::Commit(commit) => {
            prepare = prepare
                .with_shallow(depth_one)
                .with_revision(Some(commit))
                .map_err(at(Step::Prepare))?;
            None
        }
        Want::CommitOnBranch(commit) => {
            let spec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", job.branch);
            prepare = prepare
                .configure_remote(move |mut remote| {
                    // Replacing, not adding: gix has put `refs/heads/*` there already.
                    remote.replace_refspecs(Some(spec.as_str()), gix::remote::Direction::Fetch)?;
                    Ok(remote.with_fetch_tags(gix::remote::fetch::Tags::None))
                })
                .with_ref_name(Some(job.branch.as_str()))
                .map_err(at(Step::Prepare))?;
            Some(commit)
        }
    };
    // Reads the checkout's byte counters while files are written; see `limit.rs`.
    let _watch = job
        .budget
        .watch()
        .map_err(|e| CloneError::Gix(gix::Error::from_error(e), Step::Prepare))?;
    let progress = Limiter::new(job.budget.clone());
    let (mut checkout, _) = prepare
        .fetch_then_checkout(progress, &job.interrupt)
        .map_err(at(Step::Fetch))?;
    if let Some(commit) = fallback_commit {
        let repo = checkout.repo();
        let id =
            gix::ObjectId::from_hex(commit.as_bytes()).map_err(|_| CloneError::CommitMissing)?;
        if repo.find_commit(id).is_err() {
            return Err(CloneError::CommitMissing);
        }
        detach_head(repo, id).map_err(at(Step::Checkout))?;
    }
    fits(job, checkout.repo())?;
    let (repo, _) = checkout
        .main_worktree(Limiter::new(job.budget.clone()), &job.interrupt)
        .map_err(at(Step::Checkout))?;
    let head = repo.head_id().map_err(at(Step::Checkout))?;
    Ok(head.detach().to_hex().to_string())
}

/// Refuses, before any file is written, a worktree that would not fit in the size limit.
fn fits(job: &Job, repo: &gix::Repository) -> Result<(), CloneError> {
    let tree = repo.head_tree().map_err(at(Step::Checkout))?;
    let remaining = job.budget.remaining();
    let bytes = worktree_bytes(&tree, remaining, &job.interrupt).map_err(at(Step::Checkout))?;
    if !job.budget.fits(bytes) {
        return Err(CloneError::TooLarge);
    }
    Ok(())
}

/// Points HEAD at `id` directly, so the worktree checkout writes that commit's tree.
fn detach_head(repo: &gix::Repository, id: gix::ObjectId) -> Result<(), gix::Error> {
    use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit};
    repo.edit_reference(RefEdit {
        change: Change::Update {
            log: LogChange::default(),
            expected: PreviousValue::Any,
            new: gix::refs::Target::Object(id),
        },
        name: gix::refs::FullName::try_from("HEAD").map_err(gix::Error::from_error)?,
        deref: false,
    })?;
    Ok(())
}

/// The job's token as Basic credentials; gix asks only when the server answers 401, and gets it
/// only for the `git_url` host (gix asks with the URL it is talking to).
fn credentials(
    action: Action,
    token: Option<&SecretString>,
    guard: Option<&Guard>,
) -> gix::Result<Option<Outcome>> {
    match action {
        Action::Get(context) => {
            let url = context.url.clone().or_else(|| context.to_url());
            let allowed = match (guard, url) {
                (Some(guard), Some(url)) => guard.may_send_token(&url),
                // file:// has no host to send it to; an HTTP request always has a URL.
                (None, _) => true,
                (Some(_), None) => false,
            };
            if !allowed {
                return Ok(None);
            }
            Ok(token.map(|token| Outcome {
                identity: gix::sec::identity::Account {
                    username: TOKEN_USERNAME.into(),
                    password: token.expose_secret().to_owned(),
                    oauth_refresh_token: None,
                },
                next: context.into(),
            }))
        }
        // Nothing is stored or erased: the token lives only as long as the job.
        Action::Store(_) | Action::Erase(_) => Ok(None),
    }
}

type Backend = Arc<Mutex<dyn std::any::Any + Send + Sync + 'static>>;

/// reqwest settings gix has no git-config key for.
fn http_options(
    request_timeout: Duration,
    ca: Option<Vec<reqwest::Certificate>>,
    guard: Option<Arc<Guard>>,
) -> Backend {
    let options = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| {
            // reqwest's blocking client otherwise gives up on any request after 30s, which a
            // large pack exceeds. The checkout's own deadline also bounds each request, so a
            // stalled server cannot hold the thread long after the deadline.
            let mut builder = builder.timeout(request_timeout);
            if let Some(ca) = &ca {
                builder = builder.tls_certs_merge(ca.iter().cloned());
            }
            if let Some(guard) = &guard {
                builder = guard.configure(builder);
            }
            Ok(builder)
        })),
        configure_request: None,
    };
    Arc::new(Mutex::new(options))
}

fn load_ca(path: Option<&PathBuf>) -> Result<Option<Vec<reqwest::Certificate>>, Failure> {
    let Some(path) = path else { return Ok(None) };
    let pem = std::fs::read(path)
        .map_err(|e| Failure::CaFile(format!("cannot read {}: {e}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Failure::CaFile(format!("{} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Failure::CaFile(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(Some(certs))
}
