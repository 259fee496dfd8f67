//! The rules the checker verifies (named as in `docs/protocol.md`, "Server rules") and the
//! verdict on each: every check made, and what went wrong.

use std::fmt::Write as _;

/// The server rules of `docs/protocol.md` that a client can observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
}

impl Rule {
    pub const ALL: [Rule; 14] = [
        Rule::R1,
        Rule::R2,
        Rule::R3,
        Rule::R4,
        Rule::R5,
        Rule::R6,
        Rule::R7,
        Rule::R8,
        Rule::R9,
        Rule::R10,
        Rule::R11,
        Rule::R12,
        Rule::R13,
        Rule::R14,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Rule::R1 => "R1",
            Rule::R2 => "R2",
            Rule::R3 => "R3",
            Rule::R4 => "R4",
            Rule::R5 => "R5",
            Rule::R6 => "R6",
            Rule::R7 => "R7",
            Rule::R8 => "R8",
            Rule::R9 => "R9",
            Rule::R10 => "R10",
            Rule::R11 => "R11",
            Rule::R12 => "R12",
            Rule::R13 => "R13",
            Rule::R14 => "R14",
        }
    }

    /// The rule's title, word for word as in the document.
    pub fn title(self) -> &'static str {
        match self {
            Rule::R1 => "an unknown key gets 401 with a JSON error",
            Rule::R2 => "the long poll holds until a job or wait_seconds",
            Rule::R3 => "start is idempotent per lease",
            Rule::R4 => "start does not renew the lease",
            Rule::R5 => "a heartbeat renews the lease",
            Rule::R6 => "log chunks follow committed",
            Rule::R7 => "a log chunk holds at most 1 MiB",
            Rule::R8 => "logs are per lease",
            Rule::R9 => "a repeated completion is answered 200",
            Rule::R10 => "a lease not held is answered 404, 409 or 410",
            Rule::R11 => "an expired job is leased again only after a grace period",
            Rule::R12 => "a job whose lease expired before start is leased again",
            Rule::R13 => "a completion for an old lease after the job finished gets 409",
            Rule::R14 => "the conformance label gets only conformance jobs",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Verdict {
    checks: usize,
    failures: Vec<String>,
    skipped: Option<String>,
}

/// What the run found, rule by rule.
#[derive(Debug, Default, Clone)]
pub struct Report {
    verdicts: std::collections::BTreeMap<Rule, Verdict>,
    /// Lines said before the rules (the jobs used, anything unexpected).
    pub notes: Vec<String>,
    /// The run stopped early (why); rules not reached are "not checked".
    pub aborted: Option<String>,
}

impl Report {
    /// Records one check of `rule`: `Err` says what the server did wrong.
    pub fn check(&mut self, rule: Rule, outcome: Result<(), String>) {
        let v = self.verdicts.entry(rule).or_default();
        v.checks += 1;
        if let Err(what) = outcome {
            v.failures.push(what);
        }
    }

    /// Records a check that holds when `ok`, else fails with `what`.
    pub fn expect(&mut self, rule: Rule, ok: bool, what: impl FnOnce() -> String) {
        self.check(rule, if ok { Ok(()) } else { Err(what()) });
    }

    /// `rule` could not be checked against this server, for a reason the rules allow.
    pub fn skip(&mut self, rule: Rule, why: impl Into<String>) {
        self.verdicts.entry(rule).or_default().skipped = Some(why.into());
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// The rules that failed.
    pub fn failed(&self) -> Vec<Rule> {
        self.verdicts
            .iter()
            .filter(|(_, v)| !v.failures.is_empty())
            .map(|(r, _)| *r)
            .collect()
    }

    /// Every rule passed (skips allowed only where the rules allow them) and the run ended.
    pub fn passed(&self) -> bool {
        self.aborted.is_none()
            && Rule::ALL.iter().all(|r| {
                self.verdicts
                    .get(r)
                    .is_some_and(|v| v.failures.is_empty() && (v.checks > 0 || v.skipped.is_some()))
            })
    }

    /// The report as printed: one line per rule (`PASS`, `FAIL`, `SKIP`, `NOT CHECKED`), the
    /// failures under it, and a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        let (mut pass, mut fail, mut other) = (0, 0, 0);
        for rule in Rule::ALL {
            let v = self.verdicts.get(&rule).cloned().unwrap_or_default();
            let status = if !v.failures.is_empty() {
                fail += 1;
                "FAIL"
            } else if v.checks > 0 {
                pass += 1;
                "PASS"
            } else if v.skipped.is_some() {
                other += 1;
                "SKIP"
            } else {
                other += 1;
                "NOT CHECKED"
            };
            let _ = writeln!(out, "{status} {} {}", rule.id(), rule.title());
            for failure in &v.failures {
                let _ = writeln!(out, "     - {failure}");
            }
            if v.failures.is_empty()
                && v.checks == 0
                && let Some(why) = &v.skipped
            {
                let _ = writeln!(out, "     ({why})");
            }
        }
        if let Some(why) = &self.aborted {
            let _ = writeln!(out, "the run stopped early: {why}");
        }
        let _ = writeln!(
            out,
            "{pass} passed, {fail} failed, {other} skipped or not checked: {}",
            if self.passed() {
                "the server conforms"
            } else {
                "the server does NOT conform"
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_check_fails_the_rule_and_the_run() {
        let mut r = Report::default();
        for rule in Rule::ALL {
            r.check(rule, Ok(()));
        }
        assert!(r.passed());
        r.check(Rule::R3, Err("a second start got 409".into()));
        assert!(!r.passed());
        assert_eq!(r.failed(), [Rule::R3]);
        let text = r.render();
        assert!(
            text.contains("FAIL R3 start is idempotent per lease\n     - a second start got 409")
        );
        assert!(text.contains("PASS R1 "));
    }

    #[test]
    fn a_rule_never_checked_does_not_pass() {
        let mut r = Report::default();
        for rule in &Rule::ALL[1..] {
            r.check(*rule, Ok(()));
        }
        assert!(!r.passed());
        assert!(r.render().contains("NOT CHECKED R1"));
        r.skip(Rule::R1, "allowed");
        assert!(r.passed());
    }
}
