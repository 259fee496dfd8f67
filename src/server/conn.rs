//! The endpoint's own accept loop (HTTP/1.1 on hyper, the axum router as the service), so that
//! idle or slow clients cannot use up the agent's connections or descriptors:
//!
//! - a connection that does not deliver a complete request head within
//!   [`HEADER_READ_TIMEOUT`] of being opened, or of its last answer, is closed (this is also the
//!   keep-alive idle timeout);
//! - at most [`Limits::max_connections`] connections are open at once. When a new one arrives
//!   at the cap, the oldest idle connection (no request being handled) is closed to make room,
//!   so `/health` and a push request still get in while idle sockets fill the cap; if every
//!   connection is handling a request, the new one is closed at once. A descriptor shortage on
//!   `accept` also closes the oldest idle connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::AgentState;

/// Time a connection gets to send a whole request head, from its opening or its last answer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections open at once (fewer when the descriptor limit is low).
pub const MAX_CONNECTIONS: usize = 1024;
/// Descriptors left to jobs and the agent's own use when the cap is set from the limit.
const DESCRIPTOR_HEADROOM: u64 = 256;
const MIN_CONNECTIONS: usize = 16;

/// The endpoint's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Limits {
    /// [`MAX_CONNECTIONS`], lowered so that connections leave [`DESCRIPTOR_HEADROOM`] of the
    /// descriptor limit `descriptors` (`None`: unlimited) to the jobs.
    pub fn for_descriptors(descriptors: Option<u64>) -> Self {
        let by_descriptors = descriptors
            .map(|d| usize::try_from(d.saturating_sub(DESCRIPTOR_HEADROOM)).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        Limits {
            max_connections: MAX_CONNECTIONS.min(by_descriptors).max(MIN_CONNECTIONS),
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// One open connection: requests in progress, and how to close it.
struct Conn {
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// Open connections by age (ids grow).
#[derive(Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Conn>,
}

impl Registry {
    /// Closes the oldest connection handling no request; false if there is none.
    fn shed_oldest_idle(&mut self) -> bool {
        let oldest = self
            .open
            .iter()
            .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.open.remove(&id)) {
            Some(conn) => {
                conn.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Registers a new connection, making room at the cap; `None` when every connection is
    /// busy.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<AtomicUsize>, CancellationToken)> {
        if self.open.len() >= max && !self.shed_oldest_idle() {
            return None;
        }
        self.next += 1;
        let (busy, close) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        self.open.insert(
            self.next,
            Conn {
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        Some((self.next, busy, close))
    }
}

type Shared = Arc<Mutex<Registry>>;

fn lock(registry: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `router` on `listener` until `shutdown` resolves; then closes idle connections and
/// waits for the requests in progress to be answered.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    state: Arc<AgentState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry: Shared = Arc::default();
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&registry, &e).await;
                continue;
            }
        };
        let admitted = lock(&registry).admit(limits.max_connections);
        let Some((id, busy, close)) = admitted else {
            tracing::debug!("connection cap reached and every connection is busy: refused one");
            continue;
        };
        state.metrics.set_connections(lock(&registry).open.len());
        let (router, registry, state) = (router.clone(), registry.clone(), state.clone());
        tasks.spawn(async move {
            serve_one(stream, router, busy, close, limits).await;
            lock(&registry).open.remove(&id);
            state.metrics.set_connections(lock(&registry).open.len());
        });
    }
    for conn in lock(&registry).open.values() {
        conn.close.cancel();
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// A failed `accept`: a descriptor shortage frees one by closing the oldest idle connection;
/// anything but a reset connection is logged. Pauses a little either way, so a persistent
/// error does not spin.
async fn accept_failed(registry: &Shared, error: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    let emfile = matches!(
        error.raw_os_error(),
        Some(e) if e == rustix::io::Errno::MFILE.raw_os_error()
            || e == rustix::io::Errno::NFILE.raw_os_error()
    );
    if emfile {
        lock(registry).shed_oldest_idle();
    }
    tracing::warn!(error = %error, "the local endpoint cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One connection to its end: closed by the client, by the header-read timeout, or by `close`
/// (shed at the cap, or shutdown) once its request in progress is answered.
async fn serve_one(
    stream: TcpStream,
    router: Router,
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
    limits: Limits,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let counted = hyper::service::service_fn(move |request| {
        let guard = Busy::enter(&busy);
        let answer = service.call(request);
        async move {
            let response = answer.await;
            drop(guard);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), counted);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = close.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "local endpoint connection ended");
    }
}

/// Counts a request in progress on its connection while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Busy(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_sheds_the_oldest_idle_connection_and_never_a_busy_one() {
        let mut registry = Registry::default();
        let (first, first_busy, first_close) = registry.admit(2).unwrap();
        let (_, _, second_close) = registry.admit(2).unwrap();
        let _request = Busy::enter(&first_busy);
        // At the cap: the oldest idle one (the second: the first is busy) is closed.
        let (third, _, _) = registry.admit(2).unwrap();
        assert!(second_close.is_cancelled() && !first_close.is_cancelled());
        assert_eq!(
            registry.open.keys().copied().collect::<Vec<_>>(),
            [first, third]
        );
        // The third is idle: it makes room for a fourth.
        assert!(registry.admit(2).is_some());
        assert_eq!(registry.open.len(), 2);
        let mut all_busy = Registry::default();
        let (_, busy, _) = all_busy.admit(1).unwrap();
        let _request = Busy::enter(&busy);
        assert!(all_busy.admit(1).is_none());
    }

    #[test]
    fn the_cap_leaves_descriptors_to_the_jobs() {
        assert_eq!(
            Limits::for_descriptors(None).max_connections,
            MAX_CONNECTIONS
        );
        assert_eq!(
            Limits::for_descriptors(Some(65536)).max_connections,
            MAX_CONNECTIONS
        );
        assert_eq!(Limits::for_descriptors(Some(1024)).max_connections, 768);
        assert_eq!(Limits::for_descriptors(Some(100)).max_connections, 16);
    }
}
