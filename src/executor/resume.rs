//! What a running job needs to be carried on by another agent process ([`Resume`]): the
//! executor hands it to the job's observer each time it changes (`JobObserver::progress`), the
//! mode keeps it beside the job's lease, and a restarted agent gives it back to
//! `Executor::adopt_then_clean`.
//!
//! It names only what lives outside the agent process: the container (by id, with the head mark
//! its log starts with), the job network and the workspace (by name and path), the job's
//! clock as wall times, the agent's own output before the first command, the finished steps,
//! and the marks of the commands started so far (their output is in the container's log).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::container::MarkId;
use crate::wire::StepResult;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// The job container's id.
    pub container: String,
    /// The mark its main process wrote first.
    pub head: MarkId,
    /// The container runs the job's one command as its main process (else each is an exec).
    pub single: bool,
    /// The container was made before its job (a warm one): the job's environment goes with
    /// every exec.
    pub warm: bool,
    /// The job's own network, when it has one.
    pub network: Option<String>,
    pub workspace: PathBuf,
    /// When the job started (the result's `started_at`).
    pub started_unix_ms: u64,
    /// When the job's time limit runs out.
    pub deadline_unix_ms: u64,
    /// The agent's own lines before the first command (cache restores), which are in the job's
    /// log but not in its container's.
    pub preface: Vec<PrefaceLine>,
    /// The YAML steps that finished, in order.
    pub steps: Vec<StepResult>,
    /// The marks of the commands started as execs, in order: one per finished step, plus the
    /// running one's.
    pub commands: Vec<MarkId>,
    /// When the last command in `commands` started, while it has not finished.
    pub running_since_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefaceLine {
    pub stderr: bool,
    pub text: String,
}

impl Resume {
    /// Refuses a record (read from disk: outside input) whose parts are not this agent's own
    /// job's: its workspace must be one of this agent's in `work_dir`, and its network the one
    /// named after that workspace. (Its container's labels are checked against Docker.)
    pub fn check(&self, work_dir: &std::path::Path, agent_id: &str) -> Result<(), String> {
        let name = self.workspace.file_name().and_then(|n| n.to_str());
        let owner = name.and_then(super::workspace::owner_of);
        let ours = self.workspace.parent() == Some(work_dir)
            && owner.is_some_and(|(agent, _)| agent == agent_id);
        if !ours {
            return Err("its record names a workspace that is not one of this agent's".into());
        }
        let unique = super::workspace::unique_name(&self.workspace);
        match &self.network {
            Some(network) if *network != super::network::name_for(&unique) => {
                Err("its record names a network that is not its workspace's".into())
            }
            _ => Ok(()),
        }
    }

    /// The mark of the command that was running, if one was.
    pub fn running(&self) -> Option<&MarkId> {
        self.running_since_unix_ms?;
        self.commands.last()
    }
}

/// Milliseconds since the epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// The wall time of `at` (an instant of this process), in milliseconds since the epoch.
pub fn unix_ms_of(at: Instant) -> u64 {
    let now = Instant::now();
    let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    if at >= now {
        now_unix_ms().saturating_add(ms(at - now))
    } else {
        now_unix_ms().saturating_sub(ms(now - at))
    }
}

/// The instant of this process at wall time `unix_ms`: never before the process's clock can
/// say (an old time becomes the earliest instant it can give) and never overflowing.
pub fn instant_of(unix_ms: u64) -> Instant {
    let now = Instant::now();
    let wall = now_unix_ms();
    if unix_ms >= wall {
        // Bounded like every outside duration that feeds a clock (a record is outside input).
        let ahead = Duration::from_millis(unix_ms - wall)
            .min(Duration::from_secs(super::limits::MAX_SECONDS_CEILING));
        now + ahead
    } else {
        let behind = Duration::from_millis(wall - unix_ms);
        now.checked_sub(behind).unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_times_and_instants_convert_both_ways_within_a_few_milliseconds() {
        let later = Instant::now() + Duration::from_secs(90);
        let back = instant_of(unix_ms_of(later));
        let diff = if back > later {
            back - later
        } else {
            later - back
        };
        assert!(diff < Duration::from_millis(20), "{diff:?}");
    }

    #[test]
    fn times_from_a_record_never_overflow_the_clock() {
        let far = instant_of(u64::MAX);
        assert!(far > Instant::now());
        let past = instant_of(0);
        assert!(past <= Instant::now());
    }

    #[test]
    fn a_record_naming_parts_that_are_not_this_agents_is_refused() {
        let work = std::path::Path::new("/w");
        let mut resume = sample();
        resume.workspace = "/w/job+a1+7+xyz".into();
        resume.network = Some("gryt-job-a1-7-xyz".into());
        assert_eq!(resume.check(work, "a1"), Ok(()));
        assert!(resume.check(work, "other").is_err());
        assert!(
            resume
                .check(std::path::Path::new("/elsewhere"), "a1")
                .is_err()
        );
        let mut outside = resume.clone();
        outside.workspace = "/etc".into();
        assert!(outside.check(work, "a1").is_err());
        let mut network = resume.clone();
        network.network = Some("bridge".into());
        assert!(network.check(work, "a1").is_err());
    }

    fn sample() -> Resume {
        Resume {
            container: "c".into(),
            head: MarkId::random(),
            single: false,
            warm: false,
            network: None,
            workspace: "/w".into(),
            started_unix_ms: 0,
            deadline_unix_ms: 0,
            preface: Vec::new(),
            steps: Vec::new(),
            commands: Vec::new(),
            running_since_unix_ms: None,
        }
    }

    #[test]
    fn the_running_command_is_the_last_started_while_it_has_not_finished() {
        let one = MarkId::random();
        let mut resume = Resume {
            container: "c".into(),
            head: MarkId::random(),
            single: false,
            warm: false,
            network: None,
            workspace: "/w".into(),
            started_unix_ms: 0,
            deadline_unix_ms: 0,
            preface: Vec::new(),
            steps: Vec::new(),
            commands: vec![one.clone()],
            running_since_unix_ms: Some(1),
        };
        assert_eq!(resume.running(), Some(&one));
        resume.running_since_unix_ms = None;
        assert_eq!(resume.running(), None);
    }
}
