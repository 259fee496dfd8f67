//! Which images to remove, in which order: pure code, no Docker.
//!
//! Never a name a running job holds or a running container was made from, and never the last
//! name of an image such a job or container uses (removing it would delete the image; removing
//! one of several names only untags it); least recently used first, images the agent never used
//! (only under `docker.gc_images = all`) before any it used; the default image last.

use std::collections::HashSet;

use crate::config::GcImages;

/// One removable name of an image: a tag, a digest reference, or (for an untagged image under
/// `all`) its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// What is passed to the engine's remove call.
    pub reference: String,
    pub image_id: String,
    /// Docker's size of the image (freed only when its last name goes).
    pub size_bytes: u64,
    /// Last use by this agent (ms since the epoch); `None`: never used by it.
    pub last_used: Option<i64>,
    /// How many tags the image has: removing the last one deletes the image.
    pub names: usize,
}

/// What the plan must respect.
#[derive(Debug, Default)]
pub struct Protected {
    /// Image ids held by running jobs or used by running containers.
    pub image_ids: HashSet<String>,
    /// References held by running jobs (also when not resolved to an id yet).
    pub references: HashSet<String>,
}

impl Protected {
    pub fn covers(&self, candidate: &Candidate) -> bool {
        self.references.contains(&candidate.reference)
            || (candidate.names <= 1 && self.image_ids.contains(&candidate.image_id))
    }
}

/// The candidates that may go, in removal order. `default_image_id` is the id of
/// `docker.image`, when present.
pub fn order(
    mode: GcImages,
    candidates: Vec<Candidate>,
    protected: &Protected,
    default_image: &str,
    default_image_id: Option<&str>,
) -> Vec<Candidate> {
    let mut allowed: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| match mode {
            GcImages::Off => false,
            GcImages::Agent => c.last_used.is_some(),
            GcImages::All => true,
        })
        .filter(|c| !protected.covers(c))
        .collect();
    // The default image by its name, or by id when this is its last name (`alpine:latest`
    // for `alpine`): removing one of its several names would not remove it.
    let is_default = |c: &Candidate| {
        c.reference == default_image
            || (c.names <= 1 && Some(c.image_id.as_str()) == default_image_id)
    };
    // `None` (never used) sorts before any time: an image nobody here used goes first.
    allowed.sort_by(|a, b| {
        (is_default(a), a.last_used, &a.reference).cmp(&(is_default(b), b.last_used, &b.reference))
    });
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(reference: &str, id: &str, last_used: Option<i64>) -> Candidate {
        Candidate {
            reference: reference.into(),
            image_id: id.into(),
            size_bytes: 1,
            last_used,
            names: 1,
        }
    }

    fn names(plan: &[Candidate]) -> Vec<&str> {
        plan.iter().map(|c| c.reference.as_str()).collect()
    }

    #[test]
    fn least_recently_used_first_default_last_protected_never() {
        let candidates = vec![
            candidate("default:1", "d", Some(1)),
            candidate("new:1", "n", Some(30)),
            candidate("old:1", "o", Some(10)),
            candidate("running:1", "r", Some(5)),
            candidate("alias-of-running:1", "r", Some(2)),
            candidate("foreign:1", "f", None),
        ];
        let protected = Protected {
            image_ids: HashSet::from(["r".to_owned()]),
            references: HashSet::new(),
        };
        let plan = order(
            GcImages::Agent,
            candidates.clone(),
            &protected,
            "default:1",
            Some("d"),
        );
        assert_eq!(names(&plan), ["old:1", "new:1", "default:1"]);
        let plan = order(
            GcImages::All,
            candidates.clone(),
            &protected,
            "default:1",
            Some("d"),
        );
        assert_eq!(names(&plan), ["foreign:1", "old:1", "new:1", "default:1"]);
        let plan = order(GcImages::Off, candidates, &protected, "default:1", None);
        assert!(plan.is_empty());
    }

    #[test]
    fn one_of_several_names_of_a_used_image_may_go_the_last_never() {
        let protected = Protected {
            image_ids: HashSet::from(["r".to_owned()]),
            references: HashSet::from(["held:1".to_owned()]),
        };
        let mut alias = candidate("alias:1", "r", Some(1));
        alias.names = 2;
        let mut held = candidate("held:1", "r", Some(2));
        held.names = 2;
        let plan = order(
            GcImages::Agent,
            vec![alias.clone(), held],
            &protected,
            "x",
            None,
        );
        assert_eq!(names(&plan), ["alias:1"]);
        alias.names = 1;
        assert!(protected.covers(&alias));
    }

    #[test]
    fn a_held_reference_not_yet_resolved_is_protected() {
        let protected = Protected {
            image_ids: HashSet::new(),
            references: HashSet::from(["pulling:1".to_owned()]),
        };
        let plan = order(
            GcImages::Agent,
            vec![candidate("pulling:1", "p", Some(1))],
            &protected,
            "x",
            None,
        );
        assert!(plan.is_empty());
    }
}
