//! The identity graph: which ids (anonymous ids, aliases, user ids) belong to which person.
//!
//! Rules (Segment's and PostHog's): `identify` with both ids and `alias` (previousId → userId;
//! PostHog `$identify` with `$anon_distinct_id`, `$create_alias`) link an id to the user's
//! person. Placeholder ids (`anonymous`, `null`, `0`, `[object Object]`, …) never merge. An id
//! that already belongs to one person is not silently moved to another, and two identified
//! people are never merged, except by PostHog's explicit `$merge_dangerously`. The graph is a
//! function of the stream: replaying the same events gives the same graph.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Ids that SDKs send when they have no real id; merging on them would join strangers.
const PLACEHOLDERS: &[&str] = &[
    "anonymous",
    "guest",
    "distinctid",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "null",
    "true",
    "false",
    "0",
    "nan",
    "[object object]",
    "none",
    "nil",
    "-1",
    "user",
    "unknown",
];

/// Whether an id is a placeholder (case-insensitive, quotes and surrounding spaces ignored).
pub fn is_placeholder(id: &str) -> bool {
    let trimmed = id
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .trim()
        .to_ascii_lowercase();
    trimmed.is_empty() || PLACEHOLDERS.contains(&trimmed.as_str())
}

/// How an id came to belong to its person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// An anonymous id identified as the user.
    Identify,
    /// A previous id aliased to the user.
    Alias,
    /// A merge of two identified people, asked for explicitly.
    Merge,
}

impl LinkKind {
    /// The name stored in the `identities` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identify => "identify",
            Self::Alias => "alias",
            Self::Merge => "merge",
        }
    }
}

/// One id's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The person (the first identified user id of the group).
    pub person: String,
    /// How it was linked.
    pub kind: LinkKind,
    /// Stream sequence of the linking event.
    pub seq: u64,
    /// Event time of the linking event (UTC µs).
    pub at: i64,
}

/// What a merge request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The id now belongs to the person.
    Linked,
    /// Nothing to do: it already did.
    Unchanged,
    /// Refused, with the reason (logged and counted).
    Refused(String),
}

/// The graph: every linked id → its person, and the ids seen as user ids.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityGraph {
    links: HashMap<String, Link>,
    identified: HashSet<String>,
    members: HashMap<String, Vec<String>>,
}

impl IdentityGraph {
    /// The person an id belongs to (itself when it was never linked).
    pub fn person_of<'a>(&'a self, id: &'a str) -> &'a str {
        self.links.get(id).map(|l| l.person.as_str()).unwrap_or(id)
    }

    /// Every linked id with its link, for the `identities` table.
    pub fn links(&self) -> impl Iterator<Item = (&String, &Link)> {
        self.links.iter()
    }

    /// Number of linked ids.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether nothing is linked yet.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Records that `user_id` was sent as a user id (it is identified).
    pub fn observe_user(&mut self, user_id: &str) {
        if !self.identified.contains(user_id) && !is_placeholder(user_id) {
            self.identified.insert(user_id.to_string());
        }
    }

    /// `identify` with an anonymous id and a user id.
    pub fn identify(&mut self, anonymous_id: &str, user_id: &str, seq: u64, at: i64) -> Outcome {
        self.link(anonymous_id, user_id, LinkKind::Identify, seq, at, false)
    }

    /// `alias`: `previous_id` joins `user_id`'s person. `dangerously` allows merging two
    /// identified people (PostHog's `$merge_dangerously`).
    pub fn alias(
        &mut self,
        previous_id: &str,
        user_id: &str,
        seq: u64,
        at: i64,
        dangerously: bool,
    ) -> Outcome {
        let kind = if dangerously {
            LinkKind::Merge
        } else {
            LinkKind::Alias
        };
        self.link(previous_id, user_id, kind, seq, at, dangerously)
    }

    fn link(
        &mut self,
        id: &str,
        user_id: &str,
        kind: LinkKind,
        seq: u64,
        at: i64,
        dangerously: bool,
    ) -> Outcome {
        if is_placeholder(id) || is_placeholder(user_id) {
            return Outcome::Refused(format!(
                "placeholder id in a merge of `{id}` and `{user_id}`"
            ));
        }
        self.observe_user(user_id);
        let person = self.person_of(user_id).to_string();
        let current = self.person_of(id).to_string();
        if current == person {
            return Outcome::Unchanged;
        }
        if self.links.contains_key(id) && !dangerously {
            return Outcome::Refused(format!("`{id}` already belongs to person `{current}`"));
        }
        // `id` heads a person of its own (it was identified, or other ids point at it).
        let heads_identified = self.identified.contains(id)
            || self
                .members
                .get(id)
                .is_some_and(|m| m.iter().any(|x| self.identified.contains(x)));
        if heads_identified && !dangerously {
            return Outcome::Refused(format!(
                "`{id}` and `{user_id}` are both identified people; not merged"
            ));
        }
        // Move `id`'s person (itself and its members) into `person`.
        let moved_person = current;
        let mut moved = self.members.remove(&moved_person).unwrap_or_default();
        moved.push(moved_person.clone());
        if moved_person != id {
            moved.push(id.to_string());
        }
        moved.sort();
        moved.dedup();
        for member in moved {
            if member == person {
                continue;
            }
            let link = match self.links.get(&member) {
                Some(existing) if member != id => Link {
                    person: person.clone(),
                    ..existing.clone()
                },
                _ => Link {
                    person: person.clone(),
                    kind,
                    seq,
                    at,
                },
            };
            self.links.insert(member.clone(), link);
            self.members.entry(person.clone()).or_default().push(member);
        }
        Outcome::Linked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_links_anonymous_activity_to_the_user() {
        let mut graph = IdentityGraph::default();
        assert_eq!(graph.identify("anon-1", "u1", 1, 0), Outcome::Linked);
        assert_eq!(graph.person_of("anon-1"), "u1");
        assert_eq!(graph.person_of("u1"), "u1");
        assert_eq!(graph.identify("anon-1", "u1", 2, 0), Outcome::Unchanged);
    }

    #[test]
    fn placeholders_never_merge() {
        let mut graph = IdentityGraph::default();
        for placeholder in [
            "anonymous",
            "null",
            "0",
            "[object Object]",
            "\"undefined\"",
            " Guest ",
        ] {
            assert!(
                matches!(graph.identify(placeholder, "u1", 1, 0), Outcome::Refused(_)),
                "{placeholder}"
            );
        }
        assert!(graph.is_empty());
    }

    #[test]
    fn an_anonymous_id_is_not_moved_to_a_second_person() {
        let mut graph = IdentityGraph::default();
        graph.identify("anon-1", "u1", 1, 0);
        assert!(matches!(
            graph.identify("anon-1", "u2", 2, 0),
            Outcome::Refused(_)
        ));
        assert_eq!(graph.person_of("anon-1"), "u1");
    }

    #[test]
    fn two_identified_people_merge_only_dangerously() {
        let mut graph = IdentityGraph::default();
        graph.observe_user("u1");
        graph.observe_user("u2");
        graph.identify("anon-2", "u2", 1, 0);
        assert!(matches!(
            graph.alias("u2", "u1", 2, 0, false),
            Outcome::Refused(_)
        ));
        assert_eq!(graph.alias("u2", "u1", 3, 0, true), Outcome::Linked);
        assert_eq!(graph.person_of("u2"), "u1");
        assert_eq!(
            graph.person_of("anon-2"),
            "u1",
            "members move with their person"
        );
    }

    #[test]
    fn alias_chains_resolve_to_the_first_person() {
        let mut graph = IdentityGraph::default();
        assert_eq!(graph.alias("device-1", "u9", 1, 0, false), Outcome::Linked);
        assert_eq!(graph.identify("anon-7", "device-1", 2, 0), Outcome::Linked);
        assert_eq!(graph.person_of("anon-7"), "u9");
    }
}
