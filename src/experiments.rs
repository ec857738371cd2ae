//! Closing the loop on the aha threshold: holdout experiments.
//!
//! The activation analysis finds the "at least x times within y days" that best separates
//! retained from churned people; it cannot say whether reaching it *causes* retention. An
//! experiment answers that: a flag splits new people into a treated arm, whom the product
//! nudges toward the threshold (the flags answer names their arm, the onboarding answer adds a
//! step for it), and a control arm, left alone. The report then compares the arms, each person
//! in the arm the flag gives them (the same deterministic bucket as every flag):
//!
//! - the share reaching the threshold within its window (people whose window has ended);
//! - retention in the analysis's retained window (people whose retained window has ended);
//! - upgrades: people whose customer moved off the default plan after the experiment started;
//!
//! each with the treated minus control difference and its 95% interval (Newcombe's method from
//! two Wilson intervals, which holds at small counts and shares near 0 or 1, where the plain
//! normal interval does not). A person is enrolled when their signup falls while it runs.
//! People are resolved through identity merges, as in the analysis (SQL in
//! `queries/activation/experiment.sql`).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::activation::Question;
use crate::activation::analysis::{Dialect, active_condition, counted_condition, render_micros};
use crate::query::{QueryEngine, QueryError};

const EXPERIMENT_SQL: &str = include_str!("../queries/activation/experiment.sql");

/// Most experiments kept (running and ended).
pub const MAX_EXPERIMENTS: usize = 100;

/// One experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Experiment {
    /// Its id (`exp-<n>`).
    pub id: String,
    /// The flag whose buckets make the arms; its answer is `treatment` or `control`.
    pub flag: String,
    /// Share of people in the treated arm.
    pub share: f64,
    /// The threshold it nudges toward: the North Star event…
    pub event: String,
    /// …at least this many times…
    pub times: u32,
    /// …within this many days.
    pub days: u32,
    /// When it started (RFC 3339), and as UTC µs.
    pub started_at: String,
    /// Start in UTC µs.
    pub started_us: i64,
    /// When it was stopped, if it was.
    #[serde(default)]
    pub ended_at: Option<String>,
    /// End in UTC µs.
    #[serde(default)]
    pub ended_us: Option<i64>,
}

impl Experiment {
    /// Whether `person` is in the treated arm.
    pub fn treated(&self, person: &str) -> bool {
        crate::onboarding::bucket(&self.flag, person) < self.share
    }

    /// The arm's name for `person`.
    pub fn arm(&self, person: &str) -> &'static str {
        if self.treated(person) {
            "treatment"
        } else {
            "control"
        }
    }

    /// The onboarding step a treated person is shown (`completed` once they are activated).
    pub fn nudge(&self, activated: bool) -> Value {
        json!({
            "id": format!("{}-reach-threshold", self.id),
            "title": format!("Do {} {} times in your first {} days", self.event, self.times, self.days),
            "state": if activated { "completed" } else { "recommended" },
            "complete_on": self.event,
            "experiment": self.id,
        })
    }
}

/// What a start asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The flag key (default `aha_nudge_<n>`).
    #[serde(default)]
    pub flag: Option<String>,
    /// Share treated (default 0.5).
    #[serde(default)]
    pub share: Option<f64>,
    /// The threshold (default: the current version's choice).
    #[serde(default)]
    pub times: Option<u32>,
    /// Its window in days (with `times`).
    #[serde(default)]
    pub days: Option<u32>,
    /// When it started (default now). An earlier time reads a holdout already running, for
    /// example on an imported history.
    #[serde(default)]
    pub started_at: Option<String>,
}

/// Why an experiment cannot start or be reported.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The request is wrong; the field is named.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No threshold to nudge toward.
    #[error(
        "there is no current threshold to nudge toward: recompute the activation analysis, or give times and days"
    )]
    NoThreshold,
    /// No such experiment.
    #[error("no experiment `{0}`")]
    NotFound(String),
    /// The bound of experiments is reached.
    #[error("{MAX_EXPERIMENTS} experiments are kept, the bound; none more can start")]
    Full,
    /// The store could not be written.
    #[error("writing {path}: {message}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The report's query failed.
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl crate::error::Classify for ExperimentError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            Self::Invalid { .. } => ErrorKind::InvalidInput,
            Self::NoThreshold => ErrorKind::InvalidInput,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Full => ErrorKind::Unavailable,
            Self::Store { .. } => ErrorKind::Internal,
            Self::Query(error) => error.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_experiment",
            Self::NoThreshold => "no_threshold",
            Self::NotFound(_) => "experiment_not_found",
            Self::Full => "experiments_full",
            Self::Store { .. } => "experiment_not_stored",
            Self::Query(error) => error.code(),
        }
    }
}

/// The experiments of a data dir (`data/activation/experiments.json`).
#[derive(Debug)]
pub struct Experiments {
    path: PathBuf,
    list: RwLock<Vec<Experiment>>,
}

impl Experiments {
    /// Opens the experiments of `data_dir` (none when there is no file).
    pub fn open(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir
            .join(crate::catalog::ACTIVATION.dir)
            .join("experiments.json");
        let list = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            path,
            list: RwLock::new(list),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Experiment>> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(&self, list: &[Experiment]) -> Result<(), ExperimentError> {
        let bytes = serde_json::to_vec_pretty(list).unwrap_or_default();
        crate::files::write_atomic(&self.path, &bytes).map_err(|e| ExperimentError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Every experiment, oldest first.
    pub fn list(&self) -> Vec<Experiment> {
        self.read().clone()
    }

    /// The running ones.
    pub fn running(&self) -> Vec<Experiment> {
        self.read()
            .iter()
            .filter(|e| e.ended_us.is_none())
            .cloned()
            .collect()
    }

    /// One experiment.
    pub fn get(&self, id: &str) -> Result<Experiment, ExperimentError> {
        self.read()
            .iter()
            .find(|e| e.id == id)
            .cloned()
            .ok_or_else(|| ExperimentError::NotFound(id.to_string()))
    }

    /// Starts an experiment toward `current` (times, days) unless the request names its own.
    pub fn start(
        &self,
        request: &StartRequest,
        event: &str,
        current: Option<(u32, u32)>,
        now: i64,
    ) -> Result<Experiment, ExperimentError> {
        let invalid = |field, message: &str| ExperimentError::Invalid {
            field,
            message: message.to_string(),
        };
        let share = request.share.unwrap_or(0.5);
        if !(share > 0.0 && share < 1.0) {
            return Err(invalid("share", "must be between 0 and 1 (exclusive)"));
        }
        let (times, days) = match (request.times, request.days) {
            (Some(times), Some(days)) if times >= 1 && days >= 1 => (times, days),
            (None, None) => current.ok_or(ExperimentError::NoThreshold)?,
            _ => {
                return Err(invalid(
                    "times",
                    "give times and days together, each at least 1",
                ));
            }
        };
        let started_us = match &request.started_at {
            Some(text) => crate::activation::generate::parse_timestamp(text)
                .ok_or_else(|| invalid("started_at", "must be an RFC 3339 time"))?,
            None => now,
        };
        let mut list = self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.len() >= MAX_EXPERIMENTS {
            return Err(ExperimentError::Full);
        }
        let id = format!("exp-{}", list.len() + 1);
        let flag = request
            .flag
            .clone()
            .unwrap_or_else(|| format!("aha_nudge_{}", list.len() + 1));
        if flag.trim().is_empty() || list.iter().any(|e| e.flag == flag) {
            return Err(invalid("flag", "must be a key no other experiment uses"));
        }
        let experiment = Experiment {
            id,
            flag,
            share,
            event: event.to_string(),
            times,
            days,
            started_at: crate::clock::format_micros(started_us),
            started_us,
            ended_at: None,
            ended_us: None,
        };
        let mut next = list.clone();
        next.push(experiment.clone());
        self.store(&next)?;
        *list = next;
        Ok(experiment)
    }

    /// Stops an experiment: people who sign up later are not enrolled.
    pub fn stop(&self, id: &str, now: i64) -> Result<Experiment, ExperimentError> {
        let mut list = self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = list.clone();
        let experiment = next
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or_else(|| ExperimentError::NotFound(id.to_string()))?;
        if experiment.ended_us.is_none() {
            experiment.ended_us = Some(now);
            experiment.ended_at = Some(crate::clock::format_micros(now));
        }
        let stopped = experiment.clone();
        self.store(&next)?;
        *list = next;
        Ok(stopped)
    }
}

/// One enrolled person, as the report's query gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolled {
    /// The person.
    pub person_id: String,
    /// Their signup (UTC µs).
    pub signup_us: i64,
    /// Their North Star events within the threshold's window.
    pub stars: i64,
    /// Whether they were active in the retained window.
    pub retained: bool,
    /// Their customer.
    pub customer_id: Option<String>,
}

/// A proportion of an arm: how many of how many judged.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Proportion {
    /// People judged (their window has ended).
    pub judged: u64,
    /// Of them, those who did it.
    pub did: u64,
    /// `did / judged` (null when none are judged).
    pub share: Option<f64>,
}

impl Proportion {
    fn count(&mut self, did: bool) {
        self.judged += 1;
        self.did += u64::from(did);
        self.share = Some(self.did as f64 / self.judged as f64);
    }
}

/// One arm's numbers.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ArmReport {
    /// People enrolled in the arm.
    pub people: u64,
    /// Reaching the threshold within its window.
    pub reached: Proportion,
    /// Retained (active in the retained window).
    pub retained: Proportion,
    /// Upgraded (their customer moved off the default plan after the start).
    pub upgraded: Proportion,
}

/// Treated minus control, with its 95% interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Difference {
    /// Treated share minus control share.
    pub treatment_minus_control: f64,
    /// 95% interval (Newcombe, from Wilson intervals).
    pub ci95: (f64, f64),
    /// Whether the interval leaves out 0.
    pub excludes_zero: bool,
}

/// The Wilson score interval of `did` of `n` at 95%.
fn wilson(did: u64, n: u64) -> (f64, f64) {
    const Z: f64 = 1.959_964;
    let n = n as f64;
    let p = did as f64 / n;
    let centre = p + Z * Z / (2.0 * n);
    let half = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt();
    let scale = 1.0 + Z * Z / n;
    ((centre - half) / scale, (centre + half) / scale)
}

/// Newcombe's hybrid score interval of the difference of two proportions.
pub fn difference(treated: &Proportion, control: &Proportion) -> Option<Difference> {
    if treated.judged == 0 || control.judged == 0 {
        return None;
    }
    let (p1, p2) = (treated.share?, control.share?);
    let (l1, u1) = wilson(treated.did, treated.judged);
    let (l2, u2) = wilson(control.did, control.judged);
    let d = p1 - p2;
    let low = d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt();
    let high = d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt();
    Some(Difference {
        treatment_minus_control: d,
        ci95: (low, high),
        excludes_zero: low > 0.0 || high < 0.0,
    })
}

/// The people enrolled in `experiment`, from the engine's tables.
pub async fn enrolled(
    engine: &QueryEngine,
    question: &Question,
    experiment: &Experiment,
) -> Result<Vec<Enrolled>, QueryError> {
    let quote = crate::query::string_literal;
    let mut sql = EXPERIMENT_SQL
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{signup}", &quote(&question.signup_event))
        .replace("{north_star}", &quote(&experiment.event))
        .replace("{from_us}", &experiment.started_us.to_string())
        .replace(
            "{to_us}",
            &experiment.ended_us.unwrap_or(i64::MAX).to_string(),
        )
        .replace("{days}", &experiment.days.to_string())
        .replace("{retain_from}", &question.retained_days.0.to_string())
        .replace("{retain_to}", &question.retained_days.1.to_string())
        .replace("{active}", &active_condition(question))
        .replace("{counted}", counted_condition(question));
    render_micros(&mut sql, Dialect::DataFusion);
    let batches = engine.collect_internal(&sql).await?;
    let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let mut people = Vec::new();
    for batch in &batches {
        let text = |i: usize| cast(batch.column(i), &DataType::Utf8).map_err(internal);
        let number = |i: usize| cast(batch.column(i), &DataType::Int64).map_err(internal);
        let (ids, signups, stars, retained, customers) =
            (text(0)?, number(1)?, number(2)?, number(3)?, text(4)?);
        let (ids, customers) = (ids.as_string::<i32>(), customers.as_string::<i32>());
        let (signups, stars, retained) = (
            signups.as_primitive::<Int64Type>(),
            stars.as_primitive::<Int64Type>(),
            retained.as_primitive::<Int64Type>(),
        );
        for row in 0..batch.num_rows() {
            people.push(Enrolled {
                person_id: ids.value(row).to_string(),
                signup_us: signups.value(row),
                stars: stars.value(row),
                retained: retained.value(row) > 0,
                customer_id: customers
                    .is_valid(row)
                    .then(|| customers.value(row).to_string()),
            });
        }
    }
    Ok(people)
}

/// The report of `experiment` as of `now`: each arm's numbers and the differences.
/// `upgraded_since(customer)` says when a customer last moved off the default plan, if it did.
pub fn report(
    experiment: &Experiment,
    question: &Question,
    people: &[Enrolled],
    upgraded_since: &dyn Fn(&str) -> Option<i64>,
    now: i64,
) -> Value {
    const DAY: i64 = 86_400_000_000;
    let (mut treatment, mut control) = (ArmReport::default(), ArmReport::default());
    for person in people {
        let arm = if experiment.treated(&person.person_id) {
            &mut treatment
        } else {
            &mut control
        };
        arm.people += 1;
        if person.signup_us + i64::from(experiment.days) * DAY <= now {
            arm.reached
                .count(person.stars >= i64::from(experiment.times));
        }
        if person.signup_us + i64::from(question.retained_days.1) * DAY <= now {
            arm.retained.count(person.retained);
        }
        let upgraded = person
            .customer_id
            .as_deref()
            .and_then(upgraded_since)
            .is_some_and(|at| at >= experiment.started_us);
        arm.upgraded.count(upgraded);
    }
    json!({
        "experiment": experiment,
        "as_of": crate::clock::format_micros(now),
        "arms": {"treatment": treatment, "control": control},
        "difference": {
            "reached": difference(&treatment.reached, &control.reached),
            "retained": difference(&treatment.retained, &control.retained),
            "upgraded": difference(&treatment.upgraded, &control.upgraded),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_of_a_difference_follows_newcombe() {
        // Newcombe (1998), example (a): 56/70 vs 48/80 → 0.2, interval 0.0524 to 0.3339.
        let treated = Proportion {
            judged: 70,
            did: 56,
            share: Some(0.8),
        };
        let control = Proportion {
            judged: 80,
            did: 48,
            share: Some(0.6),
        };
        let d = difference(&treated, &control).unwrap();
        assert!((d.treatment_minus_control - 0.2).abs() < 1e-9);
        assert!((d.ci95.0 - 0.0524).abs() < 5e-4, "{d:?}");
        assert!((d.ci95.1 - 0.3339).abs() < 5e-4, "{d:?}");
        assert!(d.excludes_zero);
        let none = Proportion::default();
        assert!(difference(&treated, &none).is_none());
    }

    #[test]
    fn experiments_start_with_the_current_threshold_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Experiments::open(dir.path()).unwrap();
        assert!(matches!(
            store.start(&StartRequest::default(), "core", None, 0),
            Err(ExperimentError::NoThreshold)
        ));
        let started = store
            .start(&StartRequest::default(), "core", Some((3, 7)), 5)
            .unwrap();
        assert_eq!(
            (started.id.as_str(), started.times, started.days),
            ("exp-1", 3, 7)
        );
        assert_eq!(started.flag, "aha_nudge_1");
        let bad = StartRequest {
            share: Some(1.5),
            ..StartRequest::default()
        };
        assert!(matches!(
            store.start(&bad, "core", Some((3, 7)), 5),
            Err(ExperimentError::Invalid { field: "share", .. })
        ));
        store.stop("exp-1", 9).unwrap();
        let reopened = Experiments::open(dir.path()).unwrap();
        assert_eq!(reopened.get("exp-1").unwrap().ended_us, Some(9));
        assert!(reopened.running().is_empty());
    }
}
