//! What a job container is made of: its labels, its spec and the hardened host side every
//! container of the agent shares.

use std::collections::HashMap;

use bollard::models::{HostConfig, HostConfigLogConfig};

/// Label on every container (and job network) the agent creates; the orphan sweep finds them
/// by it.
pub const LABEL_MANAGED: &str = "io.gryt.agent.managed";
/// Label naming the agent that owns the container.
pub const LABEL_AGENT_ID: &str = "io.gryt.agent.id";
/// Label naming the job the container runs.
pub const LABEL_JOB_ID: &str = "io.gryt.job.id";

/// Where the workspace is mounted inside the container.
pub const WORKSPACE: &str = "/workspace";

/// The labels of everything the agent makes for a job (its containers, its network): the
/// agent's mark, the agent, the job, then `extra` (an exec's ownership labels). The one place
/// they are built, so the sweeps find all of a job's parts by the same labels.
pub fn job_labels(
    agent_id: &str,
    job_id: &str,
    extra: &[(String, String)],
) -> HashMap<String, String> {
    [
        (LABEL_MANAGED, "true"),
        (LABEL_AGENT_ID, agent_id),
        (LABEL_JOB_ID, job_id),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain(extra.iter().cloned())
    .collect()
}

/// A command of the job: a YAML step or `gryt run`, as an exec or as the main process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    pub cmd: Vec<String>,
    /// Added to the container's environment, replacing variables of the same name.
    pub env: Vec<String>,
}

/// Everything needed to create a job container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub workspace_host_path: String,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// `uid:gid`, never root.
    pub user: String,
    pub network: String,
    pub pids_limit: i64,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    /// `Some` for a single-command container (see the module doc), `None` for one that runs
    /// each command as an exec.
    pub main_command: Option<JobCommand>,
    /// The mark its main process writes first (`marks.rs`): chosen before the container is made,
    /// so a job's record can name it before the job's command can run.
    pub head: super::MarkId,
}

/// The host side of every container the agent makes: the workspace as the only mount, no
/// capabilities, `no-new-privileges`, never privileged, limits on pids, memory (no swap) and
/// CPUs, and no log copy kept by Docker. Public for programs that must start the very same
/// container themselves (the benchmark's baselines).
pub fn hardened_host_config(
    workspace: &str,
    network: &str,
    pids_limit: i64,
    memory_bytes: i64,
    nano_cpus: i64,
) -> HostConfig {
    HostConfig {
        binds: Some(vec![format!("{workspace}:{WORKSPACE}")]),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        privileged: Some(false),
        pids_limit: Some(pids_limit),
        memory: Some(memory_bytes),
        // Equal to `memory`: no swap, so the limit is a real limit and OOM is visible.
        memory_swap: Some(memory_bytes),
        nano_cpus: Some(nano_cpus),
        network_mode: Some(network.to_owned()),
        // The agent reads the output itself (attach or exec); Docker keeping a copy on
        // disk would only cost disk and time.
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        ..Default::default()
    }
}

/// `base` with `overrides` applied the way Docker applies an exec's environment: a variable
/// of the same name is replaced, a new one appended.
pub(super) fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let name = |entry: &str| entry.split('=').next().unwrap_or_default().to_owned();
    let mut merged: Vec<String> = base.to_vec();
    for entry in overrides {
        match merged.iter_mut().find(|e| name(e) == name(entry)) {
            Some(existing) => existing.clone_from(entry),
            None => merged.push(entry.clone()),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED, job_labels, merge_env};

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_step_variable_replaces_the_job_variable_of_the_same_name_and_adds_the_rest() {
        let merged = merge_env(
            &strings(&["A=job", "GRYT_WORKSPACE=/workspace", "B=x=y"]),
            &strings(&["A=step", "C=new", "AB=not-A"]),
        );
        assert_eq!(
            merged,
            strings(&[
                "A=step",
                "GRYT_WORKSPACE=/workspace",
                "B=x=y",
                "C=new",
                "AB=not-A"
            ])
        );
    }

    #[test]
    fn no_overrides_leave_the_environment_as_it_was() {
        let base = strings(&["A=1", "B="]);
        assert_eq!(merge_env(&base, &[]), base);
    }

    #[test]
    fn job_labels_mark_the_agent_and_the_job_and_keep_the_extra_ones() {
        let extra = vec![("io.gryt.exec.host".to_owned(), "h".to_owned())];
        let labels = job_labels("agent-1", "42", &extra);
        assert_eq!(labels.len(), 4);
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_AGENT_ID], "agent-1");
        assert_eq!(labels[LABEL_JOB_ID], "42");
        assert_eq!(labels["io.gryt.exec.host"], "h");
    }
}
