//! The Docker connection: the address forms the agent accepts, and the client negotiated
//! lazily with the engine's API version (so the agent starts while the engine is down).

use std::time::Duration;

use bollard::Docker;

use super::{Executor, ExecutorError};

/// How long to wait for the engine when negotiating the API version.
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(10);

impl Executor {
    /// The Docker client, negotiated with the engine when it answers (older engines need an older
    /// API version; newer ones refuse very old ones). Until the engine answers, each call tries
    /// again and returns a client whose calls fail with the engine's error.
    pub async fn docker(&self) -> Result<Docker, ExecutorError> {
        if let Some(docker) = self.negotiated_client() {
            return Ok(docker);
        }
        // Not under the lock: a slow or hung engine must not queue every other caller (a
        // health check, the sweep, other jobs) behind this request. Two callers may negotiate
        // at once; both get the same answer and the first stored wins.
        let docker = connect(self.settings.docker.host.as_deref())?;
        match tokio::time::timeout(NEGOTIATE_TIMEOUT, docker.clone().negotiate_version()).await {
            Ok(Ok(docker)) => {
                let mut negotiated = self.negotiated.lock().unwrap_or_else(|e| e.into_inner());
                Ok(negotiated.get_or_insert(docker).clone())
            }
            _ => Ok(docker),
        }
    }

    fn negotiated_client(&self) -> Option<Docker> {
        self.negotiated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when the Docker engine answers, at the least cost: a version negotiation that
    /// succeeded already proved it (one request fewer before a one-shot job), else a ping.
    pub async fn reachable(&self) -> bool {
        let _ = self.docker().await;
        if self.negotiated_client().is_some() {
            return true;
        }
        self.ping().await
    }

    /// True when the Docker engine answers a ping.
    pub async fn ping(&self) -> bool {
        let Ok(docker) = self.docker().await else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), docker.ping()).await,
            Ok(Ok(_))
        )
    }
}

pub(super) fn check_address(address: Option<&str>) -> Result<(), ExecutorError> {
    match address {
        None => Ok(()),
        Some(a)
            if ["unix://", "tcp://", "http://", "/"]
                .iter()
                .any(|p| a.starts_with(p)) =>
        {
            Ok(())
        }
        Some(other) => Err(ExecutorError::Address(other.to_owned())),
    }
}

/// Connects to `address` (`unix://`, `tcp://`, `http://`), else to the platform default
/// (`DOCKER_HOST`, then the local socket).
pub fn connect(address: Option<&str>) -> Result<Docker, ExecutorError> {
    let timeout = 600; // seconds per request: long enough for a pull's slow layers.
    check_address(address)?;
    let result = match address {
        Some(a) if a.starts_with("unix://") => {
            Docker::connect_with_unix(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(a) if a.starts_with("tcp://") || a.starts_with("http://") => {
            Docker::connect_with_http(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(a) if a.starts_with('/') => {
            Docker::connect_with_unix(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(_) | None => Docker::connect_with_local_defaults(),
    };
    result.map_err(|source| ExecutorError::Connect {
        address: address.unwrap_or("the default socket").to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Settings;
    use crate::executor::{Executor, ExecutorSettings};

    /// An engine that accepts connections and never answers: each negotiation waits its whole
    /// timeout. Callers must not queue behind each other's (4 in a row would take 4 × 10 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_do_not_queue_behind_a_hung_negotiation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.docker.host = Some(format!("tcp://{address}"));
        let executor =
            Executor::new(ExecutorSettings::from_settings(&settings, "t".into()).unwrap()).unwrap();
        let clock = std::time::Instant::now();
        let pings = futures_util::future::join_all((0..4).map(|_| executor.ping())).await;
        assert_eq!(pings, [false; 4]);
        // One negotiation (10 s) and one ping (5 s) each, side by side; queued: 40 s and more.
        assert!(
            clock.elapsed() < Duration::from_secs(30),
            "took {:?}",
            clock.elapsed()
        );
    }
}
