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
pub(crate) fn is_placeholder(id: &str) -> bool {
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

/// One id's membership, as the `identities` table and the snapshots hold it.
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

/// Most ids one person may have. A merge that would make a person larger is refused (and
/// counted with the other refusals): no real person has more devices and aliases, and the
/// bound keeps each merge's cost and each person's share of memory fixed.
pub(crate) const MAX_IDS_PER_PERSON: usize = 10_000;

/// How one linked id joined its person (the person itself is its group's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Joined {
    kind: LinkKind,
    seq: u64,
    at: i64,
}

/// The ids of one person.
#[derive(Debug, Clone)]
struct Group {
    /// The person's id: every member resolves to it.
    person: String,
    /// Every id of the person, the person's own included.
    members: Vec<String>,
    /// How many members were seen as user ids.
    identified: usize,
}

/// The graph: every linked id → its person, and the ids seen as user ids.
///
/// Ids are kept in groups, one per person; each id points at its group, and the group names
/// the person. A merge moves the smaller group's ids into the larger group and gives the
/// result the surviving person's name, so it costs the smaller side only: a chain of merges
/// into a person with 100,000 ids no longer re-files all of them each time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "GraphRecord", into = "GraphRecord")]
pub struct IdentityGraph {
    links: HashMap<String, Joined>,
    identified: HashSet<String>,
    group_of: HashMap<String, u64>,
    groups: HashMap<u64, Group>,
    next_group: u64,
    /// Ids re-filed by merges since start: what merges cost (a metric; not saved).
    moved: u64,
    /// Most ids the graph records, among user ids seen and linked ids each (`identity.maxIds`;
    /// none when unset). Not saved: the config sets it at every start.
    max_ids: Option<usize>,
}

impl IdentityGraph {
    /// The person an id belongs to (itself when it was never linked).
    pub fn person_of<'a>(&'a self, id: &'a str) -> &'a str {
        self.group_of
            .get(id)
            .and_then(|g| self.groups.get(g))
            .map_or(id, |g| g.person.as_str())
    }

    /// Every linked id with its link, for the `identities` table.
    pub fn links(&self) -> impl Iterator<Item = (&String, Link)> {
        self.links.iter().map(|(id, joined)| {
            (
                id,
                Link {
                    person: self.person_of(id).to_string(),
                    kind: joined.kind,
                    seq: joined.seq,
                    at: joined.at,
                },
            )
        })
    }

    /// Number of linked ids.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether nothing is linked yet.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Ids re-filed by merges since this graph was made or loaded: each merge re-files the
    /// smaller person's ids only.
    pub fn ids_moved(&self) -> u64 {
        self.moved
    }

    /// Bounds the ids the graph records (`identity.maxIds`): past it, a new user id is not
    /// recorded as identified and a link that would add an id is refused; the ids it holds
    /// keep resolving.
    pub fn set_max_ids(&mut self, max: usize) {
        self.max_ids = Some(max);
    }

    /// Whether the graph holds as many ids as it may.
    pub fn is_full(&self) -> bool {
        self.max_ids
            .is_some_and(|max| self.identified.len() >= max || self.group_of.len() >= max)
    }

    /// Records that `user_id` was sent as a user id (it is identified). False when the graph
    /// is full and the id is new: it is not recorded.
    pub fn observe_user(&mut self, user_id: &str) -> bool {
        if self.identified.contains(user_id) || is_placeholder(user_id) {
            return true;
        }
        if self.is_full() {
            return false;
        }
        self.identified.insert(user_id.to_string());
        if let Some(group) = self
            .group_of
            .get(user_id)
            .and_then(|g| self.groups.get_mut(g))
        {
            group.identified += 1;
        }
        true
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
        if self.is_full()
            && !(self.group_of.contains_key(id) && self.group_of.contains_key(user_id))
        {
            return Outcome::Refused(format!(
                "the identity graph holds its bound of {} ids (identity.maxIds); `{id}` is not linked to `{user_id}`",
                self.max_ids.unwrap_or_default()
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
        // `id` heads a person of its own that is identified (itself, or one of its ids).
        let heads_identified = self.identified.contains(id)
            || (current == id
                && self
                    .group_of
                    .get(id)
                    .and_then(|g| self.groups.get(g))
                    .is_some_and(|g| g.identified > 0));
        if heads_identified && !dangerously {
            return Outcome::Refused(format!(
                "`{id}` and `{user_id}` are both identified people; not merged"
            ));
        }
        let into = self.group_for(&person);
        let from = self.group_for(&current);
        let (into_len, from_len) = (
            self.groups[&into].members.len(),
            self.groups[&from].members.len(),
        );
        if into_len + from_len > MAX_IDS_PER_PERSON {
            return Outcome::Refused(format!(
                "merging `{id}` into `{person}` would give one person {} ids; at most {MAX_IDS_PER_PERSON}",
                into_len + from_len
            ));
        }
        // The head of the person that joins, and `id` itself, are linked by this event; the
        // other ids keep how they joined.
        let joined = Joined { kind, seq, at };
        self.links.insert(current.clone(), joined);
        self.links.insert(id.to_string(), joined);
        let (keep, drop) = if into_len >= from_len {
            (into, from)
        } else {
            (from, into)
        };
        let Some(dropped) = self.groups.remove(&drop) else {
            return Outcome::Linked;
        };
        for member in &dropped.members {
            self.group_of.insert(member.clone(), keep);
        }
        self.moved += dropped.members.len() as u64;
        if let Some(kept) = self.groups.get_mut(&keep) {
            kept.members.extend(dropped.members);
            kept.identified += dropped.identified;
            kept.person = person;
        }
        Outcome::Linked
    }

    /// Every id of `id`'s person: the person's own, `id`, and every id merged into them.
    pub fn ids_of_person(&self, id: &str) -> Vec<String> {
        match self.group_of.get(id).and_then(|g| self.groups.get(g)) {
            Some(group) => group.members.clone(),
            None => vec![id.to_string()],
        }
    }

    /// Forgets `ids` and every id of their people (a person erased): their links, their
    /// groups and that they were identified. An id seen after this starts a person anew.
    pub fn forget(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(group) = self.group_of.get(id).copied()
                && let Some(removed) = self.groups.remove(&group)
            {
                for member in removed.members {
                    self.group_of.remove(&member);
                    self.links.remove(&member);
                    self.identified.remove(&member);
                }
            }
            self.group_of.remove(id);
            self.links.remove(id);
            self.identified.remove(id);
        }
    }

    /// The group of `id`, made (with `id` alone) if it has none.
    fn group_for(&mut self, id: &str) -> u64 {
        if let Some(group) = self.group_of.get(id) {
            return *group;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.group_of.insert(id.to_string(), group);
        self.groups.insert(
            group,
            Group {
                person: id.to_string(),
                members: vec![id.to_string()],
                identified: usize::from(self.identified.contains(id)),
            },
        );
        group
    }
}

/// The graph as snapshots store it: every linked id with its person, the identified ids, and
/// each person's other ids.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GraphRecord {
    links: HashMap<String, Link>,
    identified: HashSet<String>,
    members: HashMap<String, Vec<String>>,
}

impl From<IdentityGraph> for GraphRecord {
    fn from(graph: IdentityGraph) -> Self {
        let links = graph.links().map(|(id, link)| (id.clone(), link)).collect();
        let members = graph
            .groups
            .values()
            .map(|g| {
                let others = g.members.iter().filter(|m| **m != g.person).cloned();
                (g.person.clone(), others.collect())
            })
            .collect();
        Self {
            links,
            identified: graph.identified,
            members,
        }
    }
}

impl From<GraphRecord> for IdentityGraph {
    fn from(record: GraphRecord) -> Self {
        let mut graph = Self {
            identified: record.identified,
            ..Self::default()
        };
        for (person, members) in record.members {
            let group = graph.group_for(&person);
            for member in members {
                if member == person || graph.group_of.contains_key(&member) {
                    continue;
                }
                graph.group_of.insert(member.clone(), group);
                if let Some(g) = graph.groups.get_mut(&group) {
                    g.identified += usize::from(graph.identified.contains(&member));
                    g.members.push(member);
                }
            }
        }
        for (id, link) in record.links {
            // A link whose person has no member list (written by hand, or cut short) still
            // resolves to its person.
            if !graph.group_of.contains_key(&id) {
                let group = graph.group_for(&link.person);
                graph.group_of.insert(id.clone(), group);
                if let Some(g) = graph.groups.get_mut(&group) {
                    g.identified += usize::from(graph.identified.contains(&id));
                    g.members.push(id.clone());
                }
            }
            graph.links.insert(
                id,
                Joined {
                    kind: link.kind,
                    seq: link.seq,
                    at: link.at,
                },
            );
        }
        graph
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_person_leaves_no_id_behind_and_can_start_anew() {
        let mut graph = IdentityGraph::default();
        graph.observe_user("u1");
        assert_eq!(graph.identify("anon-1", "u1", 1, 0), Outcome::Linked);
        assert_eq!(graph.alias("old-1", "u1", 2, 0, false), Outcome::Linked);
        assert_eq!(graph.identify("anon-2", "u2", 3, 0), Outcome::Linked);
        let mut ids = graph.ids_of_person("anon-1");
        ids.sort();
        assert_eq!(ids, ["anon-1", "old-1", "u1"]);
        assert_eq!(graph.ids_of_person("never-seen"), ["never-seen"]);
        graph.forget(&ids);
        assert_eq!(graph.person_of("anon-1"), "anon-1");
        assert_eq!(graph.person_of("old-1"), "old-1");
        assert!(graph.links().all(|(id, _)| id.ends_with('2')));
        assert_eq!(graph.person_of("anon-2"), "u2", "others are untouched");
        // Not identified any more: an anonymous id may join them again.
        assert_eq!(graph.identify("anon-3", "u1", 4, 0), Outcome::Linked);
        let record: IdentityGraph =
            serde_json::from_str(&serde_json::to_string(&graph).unwrap()).unwrap();
        assert_eq!(record.person_of("old-1"), "old-1");
    }

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

    /// 2,500 `$merge_dangerously` chained onto a person of 7,000 ids used to re-file all of
    /// them on every merge (~16 merges/s in the followers); now each moves the smaller side.
    #[test]
    fn a_chain_of_merges_into_a_large_person_moves_the_small_side_only() {
        let mut graph = IdentityGraph::default();
        for i in 0..7_000 {
            graph.identify(&format!("anon-{i}"), "big", i, 0);
        }
        let before = graph.ids_moved();
        let mut head = "big".to_string();
        for k in 0..2_500u64 {
            let next = format!("user-{k}");
            graph.observe_user(&next);
            assert_eq!(
                graph.alias(&head, &next, 10_000 + k, 0, true),
                Outcome::Linked
            );
            head = next;
        }
        assert_eq!(graph.person_of("anon-17"), "user-2499");
        assert_eq!(graph.person_of("big"), "user-2499");
        let moved = graph.ids_moved() - before;
        assert!(moved <= 2 * 2_500, "moved {moved} ids for 2,500 merges");
    }

    #[test]
    fn a_person_past_the_bound_takes_no_more_ids() {
        let mut graph = IdentityGraph::default();
        for i in 0..MAX_IDS_PER_PERSON - 1 {
            assert_eq!(
                graph.identify(&format!("a-{i}"), "u", 1, 0),
                Outcome::Linked
            );
        }
        let refused = graph.identify("one-too-many", "u", 2, 0);
        assert!(
            matches!(&refused, Outcome::Refused(r) if r.contains("at most 10000")),
            "{refused:?}"
        );
        assert_eq!(graph.person_of("one-too-many"), "one-too-many");
    }

    #[test]
    fn snapshots_keep_every_person_and_read_the_earlier_format() {
        let mut graph = IdentityGraph::default();
        graph.observe_user("u1");
        graph.observe_user("u2");
        graph.identify("anon-1", "u1", 1, 10);
        graph.identify("anon-2", "u2", 2, 20);
        graph.alias("u2", "u1", 3, 30, true);
        graph.alias("device", "anon-1", 4, 40, false);
        let text = serde_json::to_string(&graph).unwrap();
        let back: IdentityGraph = serde_json::from_str(&text).unwrap();
        for id in ["anon-1", "anon-2", "u2", "device", "u1", "stranger"] {
            assert_eq!(back.person_of(id), graph.person_of(id), "{id}");
        }
        let mut links: Vec<_> = back.links().map(|(id, l)| (id.clone(), l)).collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(links.len(), 4);
        assert_eq!(links[0].1.person, "u1");
        // The shape snapshots had before groups: links with their person, and members.
        let earlier = r#"{"links":{"anon-9":{"person":"u9","kind":"identify","seq":5,"at":0}},
            "identified":["u9"],"members":{"u9":["anon-9"]}}"#;
        let old: IdentityGraph = serde_json::from_str(earlier).unwrap();
        assert_eq!(old.person_of("anon-9"), "u9");
        assert!(matches!(
            IdentityGraph::clone(&old).identify("anon-9", "u8", 6, 0),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn alias_chains_resolve_to_the_first_person() {
        let mut graph = IdentityGraph::default();
        assert_eq!(graph.alias("device-1", "u9", 1, 0, false), Outcome::Linked);
        assert_eq!(graph.identify("anon-7", "device-1", 2, 0), Outcome::Linked);
        assert_eq!(graph.person_of("anon-7"), "u9");
    }

    /// A full graph records no new id, refuses links that would add one, and keeps resolving
    /// the ids it holds (and linking them among themselves).
    #[test]
    fn a_full_graph_refuses_new_ids_and_keeps_the_ones_it_holds() {
        let mut graph = IdentityGraph::default();
        graph.set_max_ids(4);
        assert_eq!(graph.identify("anon-1", "u1", 1, 0), Outcome::Linked);
        assert_eq!(graph.identify("anon-2", "u2", 2, 0), Outcome::Linked);
        assert!(graph.is_full());
        assert!(matches!(
            graph.identify("anon-3", "u3", 3, 0),
            Outcome::Refused(reason) if reason.contains("identity.maxIds")
        ));
        assert!(!graph.observe_user("u4"));
        assert_eq!(graph.person_of("anon-3"), "anon-3");
        assert_eq!(graph.person_of("anon-1"), "u1");
        assert_eq!(graph.person_of("anon-2"), "u2");
        assert_eq!(graph.alias("anon-2", "u1", 4, 0, true), Outcome::Linked);
        assert_eq!(graph.person_of("anon-2"), "u1");
    }
}
