//! Keeps job networks from the cloud metadata service and from each other: firewall rules that
//! drop traffic from the job network pool to 169.254.169.254 (and, over IPv6, from job network
//! bridges to fd00:ec2::254), and traffic routed from one job network to another, installed when
//! the agent may change the firewall.
//!
//! On a cloud VM the metadata address hands out the VM's credentials to whoever asks; a job
//! must not be one of them. Docker keeps its user-defined networks apart itself, but every time
//! it makes a network it deletes and re-inserts its jumps from `FORWARD` (to `DOCKER-USER` and to
//! its isolation chains): for those moments neither is consulted, and a connection from one job
//! network to another was seen to get through on a busy engine. So the rules are in the `mangle`
//! table's `FORWARD` chain, which is consulted before the `filter` table's and which Docker never
//! touches; traffic within one job network is bridged (`--physdev-is-bridged`) and not matched.
//! The rules are installed idempotently (`-C` before `-I`) with the
//! `iptables` command (Debian's `iptables` package): by the executor before its first job
//! network when the agent is root or has CAP_NET_ADMIN, or by `gryt-agent guard-metadata`, the
//! privileged pre-start step of the packaged (non-root) service. `gryt-agent check` reports
//! whether the IPv4 rule is in place. Only job networks are covered: `bridge` and named
//! networks are the operator's.

use std::time::Duration;

use super::network::{BRIDGE_PREFIX, Pool};

/// The metadata address of AWS, GCP, Azure and most other clouds.
pub const METADATA_V4: &str = "169.254.169.254/32";
/// AWS's IPv6 metadata address.
pub const METADATA_V6: &str = "fd00:ec2::254/128";
/// The table and chain of the rules: before Docker's `filter` rules, and never rewritten by it.
pub const TABLE: &str = "mangle";
pub const CHAIN: &str = "FORWARD";
/// How long one `iptables` call may take, the xtables lock wait included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a rule is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleState {
    Present,
    Absent,
    /// Cannot tell (no `iptables`, no permission, no such table): why.
    Unknown(String),
}

/// What installing the rules did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    pub v4: Result<(), String>,
    /// `Err` too when the host has no IPv6 firewall: job networks are IPv4 only, so they have
    /// no IPv6 route anyway.
    pub v6: Result<(), String>,
}

/// The IPv4 rule's arguments after the command (`-C`, `-I`): drop the pool's traffic to the
/// metadata address.
pub fn v4_rule(pool: Pool) -> Vec<String> {
    let pool = pool.to_string();
    ["-s", &pool, "-d", METADATA_V4, "-j", "DROP"]
        .map(String::from)
        .to_vec()
}

/// The IPv4 rule that keeps job networks apart: what is routed from the pool to the pool, i.e.
/// from one job network to another (traffic within one network is bridged, not routed).
pub fn v4_isolation_rule(pool: Pool) -> Vec<String> {
    let pool = pool.to_string();
    [
        "-s",
        &pool,
        "-d",
        &pool,
        "-m",
        "physdev",
        "!",
        "--physdev-is-bridged",
        "-j",
        "DROP",
    ]
    .map(String::from)
    .to_vec()
}

/// Both IPv4 rules: the metadata drop and the isolation between job networks.
pub fn v4_rules(pool: Pool) -> [Vec<String>; 2] {
    [v4_rule(pool), v4_isolation_rule(pool)]
}

/// The IPv6 rule: job network bridges (named `gryt-...`) to AWS's IPv6 metadata address.
pub fn v6_rule() -> Vec<String> {
    let bridges = format!("{BRIDGE_PREFIX}+");
    ["-i", &bridges, "-d", METADATA_V6, "-j", "DROP"]
        .map(String::from)
        .to_vec()
}

/// Whether this process may change the firewall: root, or CAP_NET_ADMIN in its effective set.
pub fn may_change_firewall() -> bool {
    rustix::process::geteuid().is_root() || has_net_admin()
}

fn has_net_admin() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|caps| {
        caps.effective
            .contains(rustix::thread::CapabilitySet::NET_ADMIN)
    })
}

/// Whether both IPv4 rules for `pool` are in place (the first one missing or unknown says).
pub async fn v4_state(pool: Pool) -> RuleState {
    for rule in v4_rules(pool) {
        match check("iptables", &rule).await {
            RuleState::Present => {}
            other => return other,
        }
    }
    RuleState::Present
}

/// Installs the rules where missing, first in the chain (before any ACCEPT an operator put
/// there). Call only when [`may_change_firewall`].
pub async fn install(pool: Pool) -> Guarded {
    let [metadata, isolation] = v4_rules(pool);
    let v4 = match ensure("iptables", &metadata).await {
        Ok(()) => ensure("iptables", &isolation).await,
        Err(e) => Err(e),
    };
    Guarded {
        v4,
        v6: ensure("ip6tables", &v6_rule()).await,
    }
}

async fn ensure(command: &str, rule: &[String]) -> Result<(), String> {
    match check(command, rule).await {
        RuleState::Present => Ok(()),
        RuleState::Absent => {
            let output = iptables(command, "-I", rule).await?;
            if output.status.success() {
                Ok(())
            } else {
                Err(failure(command, &output))
            }
        }
        RuleState::Unknown(why) => Err(why),
    }
}

async fn check(command: &str, rule: &[String]) -> RuleState {
    match iptables(command, "-C", rule).await {
        Ok(output) if output.status.success() => RuleState::Present,
        // `-C` exits 1 for a rule that is not there ("Bad rule"); 1 is also "No chain/target/
        // match by that name" (no such table or match module), which the message tells apart.
        Ok(output)
            if output.status.code() == Some(1)
                && !String::from_utf8_lossy(&output.stderr).contains("No chain") =>
        {
            RuleState::Absent
        }
        Ok(output) => RuleState::Unknown(failure(command, &output)),
        Err(why) => RuleState::Unknown(why),
    }
}

async fn iptables(
    command: &str,
    action: &str,
    rule: &[String],
) -> Result<std::process::Output, String> {
    let mut call = tokio::process::Command::new(command);
    call.args(["-w", "5", "-t", TABLE, action, CHAIN])
        .args(rule)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(CALL_TIMEOUT, call.output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "`{command}` is not installed (Debian package `iptables`)"
        )),
        Ok(Err(e)) => Err(format!("cannot run `{command}`: {e}")),
        Err(_) => Err(format!(
            "`{command}` did not answer within {}s",
            CALL_TIMEOUT.as_secs()
        )),
    }
}

fn failure(command: &str, output: &std::process::Output) -> String {
    let said = String::from_utf8_lossy(&output.stderr);
    let said: String = said.trim().chars().take(300).collect();
    format!(
        "`{command} -t {TABLE} ... {CHAIN}` failed ({}): {said}",
        output.status
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_drop_the_pool_and_the_job_bridges_to_the_metadata_addresses() {
        let pool: Pool = "10.213.0.0/16".parse().unwrap();
        assert_eq!(
            v4_rule(pool).join(" "),
            "-s 10.213.0.0/16 -d 169.254.169.254/32 -j DROP"
        );
        assert_eq!(
            v4_isolation_rule(pool).join(" "),
            "-s 10.213.0.0/16 -d 10.213.0.0/16 -m physdev ! --physdev-is-bridged -j DROP"
        );
        assert_eq!(
            v6_rule().join(" "),
            "-i gryt-+ -d fd00:ec2::254/128 -j DROP"
        );
    }
}
