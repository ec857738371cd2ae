//! Activation ("aha") threshold statistics.
//!
//! A candidate threshold is "did the North Star event at least `times` times within `days` days of
//! signup". It splits a signup cohort into a 2x2 table:
//!
//! |              | retained | churned |
//! |--------------|----------|---------|
//! | did          | a        | b       |
//! | did not      | c        | d       |
//!
//! Definitions used throughout the activation modules:
//! - day k after signup is the half-open interval `[signup + k·24h, signup + (k+1)·24h)`;
//! - "within y days" means a timestamp in `[signup, signup + y·24h)`;
//! - a user is "retained" when they have at least one event of any kind in days `[28, 56)`;
//! - the cohort is every user whose signup is at least 56 days before the end of the data.
//!
//! This module only turns counted cells into statistics and picks the best threshold; counting is
//! done elsewhere (DataFusion SQL in production, a hand count in tests).

use serde::{Deserialize, Serialize};

/// Two-sided 97.5% standard normal quantile, for 95% confidence intervals.
const Z_95: f64 = 1.959964;

/// Largest |phi| fed to `atanh`, so that a perfect correlation still gets a finite interval.
const PHI_CLAMP: f64 = 1.0 - 1e-9;

/// Counted 2x2 table for one candidate threshold; the raw input to every statistic here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Minimum number of North Star events (x).
    pub times: u32,
    /// Length of the performance window in days after signup (y).
    pub days: u32,
    /// Did the event at least `times` times and was retained.
    pub a: u64,
    /// Did the event at least `times` times and churned.
    pub b: u64,
    /// Did not reach the threshold and was retained.
    pub c: u64,
    /// Did not reach the threshold and churned.
    pub d: u64,
}

impl Cell {
    /// Cohort size, so callers need not repeat `a + b + c + d`.
    pub fn n(&self) -> u64 {
        self.a + self.b + self.c + self.d
    }
}

/// Every statistic reported for one candidate, so a reader can judge the choice, not just see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Minimum number of North Star events (x).
    pub times: u32,
    /// Performance window in days after signup (y).
    pub days: u32,
    /// Did and retained.
    pub a: u64,
    /// Did and churned.
    pub b: u64,
    /// Did not and retained.
    pub c: u64,
    /// Did not and churned.
    pub d: u64,
    /// Cohort size.
    pub n: u64,
    /// Share of the cohort above the threshold, (a+b)/n; 0 for an empty cohort.
    pub share_above: f64,
    /// Retention of users above the threshold, a/(a+b); `None` when nobody is above.
    pub retention_above: Option<f64>,
    /// Retention of users below the threshold, c/(c+d); `None` when nobody is below.
    pub retention_below: Option<f64>,
    /// retention_above / retention_below; `None` when either is undefined or the divisor is 0.
    pub lift: Option<f64>,
    /// Share of retained users who reached the threshold, a/(a+c).
    pub sensitivity: Option<f64>,
    /// Share of churned users who did not reach the threshold, d/(b+d).
    pub specificity: Option<f64>,
    /// Phi coefficient of the 2x2 table; `None` when a row or column is empty.
    pub phi: Option<f64>,
    /// Lower end of the 95% Fisher-z interval for phi; `None` when n ≤ 3 or phi is undefined.
    pub phi_ci_low: Option<f64>,
    /// Upper end of the 95% Fisher-z interval for phi; `None` when n ≤ 3 or phi is undefined.
    pub phi_ci_high: Option<f64>,
    /// Whether this candidate may be chosen at all.
    pub passes_guards: bool,
    /// One sentence per failed guard, so a rejected candidate explains itself.
    pub guard_failures: Vec<String>,
}

/// Guards against thresholds that look strong only because of tiny or lopsided groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    /// Every one of a, b, c, d must hold at least this many users.
    pub min_cell: u64,
    /// Lowest acceptable share above the threshold (inclusive).
    pub share_min: f64,
    /// Highest acceptable share above the threshold (inclusive).
    pub share_max: f64,
}

impl Default for Guards {
    /// Defaults after Mixpanel Signal / Amplitude Compass: 10 users per cell, 5%–95% above.
    fn default() -> Self {
        Self {
            min_cell: 10,
            share_min: 0.05,
            share_max: 0.95,
        }
    }
}

/// Result of judging a grid of candidates: everything, the choice, and why there is none if so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// All candidates, sorted by phi descending (ties: fewer times, then fewer days), undefined last.
    pub candidates: Vec<Candidate>,
    /// The argmax of phi among candidates passing the guards.
    pub chosen: Option<Candidate>,
    /// When nothing was chosen, a sentence saying why.
    pub reason: Option<String>,
}

/// Ratio that is undefined (rather than NaN or infinite) when the denominator is zero.
fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Phi coefficient (ad − bc)/√((a+b)(c+d)(a+c)(b+d)), `None` when a margin is empty.
pub fn phi(cell: &Cell) -> Option<f64> {
    let (a, b, c, d) = (cell.a as f64, cell.b as f64, cell.c as f64, cell.d as f64);
    let den = ((a + b) * (c + d) * (a + c) * (b + d)).sqrt();
    if den > 0.0 {
        Some(((a * d - b * c) / den).clamp(-1.0, 1.0))
    } else {
        None
    }
}

/// 95% confidence interval for phi via the Fisher z-transform.
///
/// |phi| = 1 would make `atanh` infinite, so phi is clamped just inside ±1 first; the interval is
/// then one-sided in practice (its far end is ±1).
pub(crate) fn phi_interval(phi: f64, n: u64) -> Option<(f64, f64)> {
    if n <= 3 || !phi.is_finite() {
        return None;
    }
    let z = phi.clamp(-PHI_CLAMP, PHI_CLAMP).atanh();
    let se = 1.0 / ((n - 3) as f64).sqrt();
    let low = (z - Z_95 * se).tanh();
    let high = (z + Z_95 * se).tanh();
    Some((low.clamp(-1.0, 1.0), high.clamp(-1.0, 1.0)))
}

/// A share as a percentage with one decimal, rounded half away from zero on the per-mille
/// (991 of 2000 is 49.6%): the one rounding of the table, the picture and its summary, so
/// they never show the same share two ways.
pub fn percent_tenths(fraction: f64) -> String {
    format!("{:.1}%", (fraction * 1000.0).round() / 10.0)
}

/// A fraction as a short percentage for sentences ("5%", "49.6%"): the same rounding as
/// [`percent_tenths`], without a trailing ".0".
pub fn percent(fraction: f64) -> String {
    let tenths = (fraction * 1000.0).round();
    if tenths % 10.0 == 0.0 {
        format!("{:.0}%", tenths / 10.0)
    } else {
        format!("{:.1}%", tenths / 10.0)
    }
}

/// Sentences for every guard this cell fails; empty when the candidate may be chosen.
fn guard_failures(cell: &Cell, share_above: f64, phi: Option<f64>, guards: &Guards) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, count) in [("a", cell.a), ("b", cell.b), ("c", cell.c), ("d", cell.d)] {
        if count < guards.min_cell {
            failures.push(format!(
                "cell {name} has {count} users, fewer than {}",
                guards.min_cell
            ));
        }
    }
    if share_above < guards.share_min || share_above > guards.share_max {
        failures.push(format!(
            "share above threshold {} is outside {}–{}",
            percent(share_above),
            percent(guards.share_min),
            percent(guards.share_max)
        ));
    }
    if phi.is_none() {
        failures.push("phi is undefined (a row or column of the table is empty)".to_string());
    }
    failures
}

impl Candidate {
    /// Compute every statistic for one counted cell and judge it against the guards.
    pub fn from_cell(cell: &Cell, guards: &Guards) -> Self {
        let n = cell.n();
        let share_above = ratio(cell.a + cell.b, n).unwrap_or(0.0);
        let retention_above = ratio(cell.a, cell.a + cell.b);
        let retention_below = ratio(cell.c, cell.c + cell.d);
        let lift = match (retention_above, retention_below) {
            (Some(above), Some(below)) if below > 0.0 => Some(above / below),
            _ => None,
        };
        let phi = phi(cell);
        let interval = phi.and_then(|p| phi_interval(p, n));
        let guard_failures = guard_failures(cell, share_above, phi, guards);
        Self {
            times: cell.times,
            days: cell.days,
            a: cell.a,
            b: cell.b,
            c: cell.c,
            d: cell.d,
            n,
            share_above,
            retention_above,
            retention_below,
            lift,
            sensitivity: ratio(cell.a, cell.a + cell.c),
            specificity: ratio(cell.d, cell.b + cell.d),
            phi,
            phi_ci_low: interval.map(|(low, _)| low),
            phi_ci_high: interval.map(|(_, high)| high),
            passes_guards: guard_failures.is_empty(),
            guard_failures,
        }
    }

    /// Whether every cell holds at least `min_cell` users (used to explain an empty choice).
    fn has_enough_users(&self, min_cell: u64) -> bool {
        [self.a, self.b, self.c, self.d]
            .iter()
            .all(|&count| count >= min_cell)
    }

    /// Whether the share above lies inside the guard band (used to explain an empty choice).
    fn share_in_band(&self, guards: &Guards) -> bool {
        self.share_above >= guards.share_min && self.share_above <= guards.share_max
    }
}

/// Ranking order: higher phi first, undefined phi last, then fewer times, then fewer days.
fn rank(x: &Candidate, y: &Candidate) -> std::cmp::Ordering {
    let by_phi = match (x.phi, y.phi) {
        (Some(px), Some(py)) => py.total_cmp(&px),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    };
    by_phi.then(x.times.cmp(&y.times)).then(x.days.cmp(&y.days))
}

/// A sentence explaining why no candidate passed the guards.
fn no_choice_reason(candidates: &[Candidate], guards: &Guards) -> String {
    if candidates.is_empty() {
        return "no candidates were evaluated (the cohort or the grid is empty)".to_string();
    }
    let enough: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.has_enough_users(guards.min_cell))
        .collect();
    if enough.is_empty() {
        return format!(
            "no candidate has at least {} users in every cell",
            guards.min_cell
        );
    }
    if enough.iter().all(|c| !c.share_in_band(guards)) {
        return format!(
            "every candidate with enough users has a share above threshold outside {}–{}",
            percent(guards.share_min),
            percent(guards.share_max)
        );
    }
    "no candidate with enough users and a share in band has a defined phi".to_string()
}

/// Score every cell, rank them, and choose the best threshold that passes the guards.
pub fn evaluate(cells: &[Cell], guards: &Guards) -> Evaluation {
    let mut candidates: Vec<Candidate> = cells
        .iter()
        .map(|cell| Candidate::from_cell(cell, guards))
        .collect();
    candidates.sort_by(rank);
    let chosen = candidates.iter().find(|c| c.passes_guards).cloned();
    let reason = if chosen.is_none() {
        Some(no_choice_reason(&candidates, guards))
    } else {
        None
    };
    Evaluation {
        candidates,
        chosen,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(times: u32, days: u32, a: u64, b: u64, c: u64, d: u64) -> Cell {
        Cell {
            times,
            days,
            a,
            b,
            c,
            d,
        }
    }

    fn close(x: f64, y: f64) -> bool {
        (x - y).abs() < 1e-9
    }

    #[test]
    fn hand_computed_two_by_two() {
        // a=40 (did, retained), b=10 (did, churned), c=20 (not, retained), d=30 (not, churned); n=100.
        // ad − bc = 1200 − 200 = 1000
        // (a+b)(c+d)(a+c)(b+d) = 50 · 50 · 60 · 40 = 6,000,000; √ = 2449.4897…
        // phi = 1000 / 2449.4897 = 0.408248… (= 1/√6)
        // Fisher: z = atanh(0.408248) = 0.433519, se = 1/√97 = 0.101535,
        //         CI = tanh(0.433519 ± 0.199005) = [0.2294, 0.5601]
        let c = Candidate::from_cell(&cell(3, 7, 40, 10, 20, 30), &Guards::default());
        assert_eq!(c.n, 100);
        assert!(close(c.share_above, 0.5));
        assert!(close(c.retention_above.unwrap_or_default(), 0.8));
        assert!(close(c.retention_below.unwrap_or_default(), 0.4));
        assert!(close(c.lift.unwrap_or_default(), 2.0));
        assert!(close(c.sensitivity.unwrap_or_default(), 40.0 / 60.0));
        assert!(close(c.specificity.unwrap_or_default(), 0.75));
        assert!(close(c.phi.unwrap_or_default(), 1.0 / 6f64.sqrt()));
        assert!((c.phi_ci_low.unwrap_or_default() - 0.2294).abs() < 1e-3);
        assert!((c.phi_ci_high.unwrap_or_default() - 0.5601).abs() < 1e-3);
        assert!(c.passes_guards, "{:?}", c.guard_failures);
    }

    #[test]
    fn interval_contains_phi_and_narrows_with_n() {
        let small = Candidate::from_cell(&cell(1, 1, 40, 10, 20, 30), &Guards::default());
        let large = Candidate::from_cell(&cell(1, 1, 400, 100, 200, 300), &Guards::default());
        for c in [&small, &large] {
            let (low, phi, high) = (
                c.phi_ci_low.unwrap_or(2.0),
                c.phi.unwrap_or(0.0),
                c.phi_ci_high.unwrap_or(-2.0),
            );
            assert!(low < phi && phi < high, "{low} {phi} {high}");
        }
        let width = |c: &Candidate| c.phi_ci_high.unwrap_or(0.0) - c.phi_ci_low.unwrap_or(0.0);
        assert!(close(small.phi.unwrap_or(0.0), large.phi.unwrap_or(1.0)));
        assert!(width(&large) < width(&small) / 2.0);
    }

    #[test]
    fn perfect_correlation_has_finite_interval() {
        let c = Candidate::from_cell(
            &cell(1, 1, 50, 0, 0, 50),
            &Guards {
                min_cell: 0,
                ..Guards::default()
            },
        );
        assert_eq!(c.phi, Some(1.0));
        let (low, high) = (
            c.phi_ci_low.unwrap_or(f64::NAN),
            c.phi_ci_high.unwrap_or(f64::NAN),
        );
        assert!(low.is_finite() && low > 0.9 && low < 1.0, "{low}");
        assert!(close(high, 1.0));
    }

    #[test]
    fn guards_exclude_small_cells_and_extreme_shares() {
        let guards = Guards::default();
        let small = Candidate::from_cell(&cell(1, 1, 500, 5, 200, 300), &guards);
        assert!(!small.passes_guards);
        assert!(
            small
                .guard_failures
                .iter()
                .any(|f| f.contains("cell b has 5 users"))
        );
        // share above = 970 / 1000 = 97%
        let lopsided = Candidate::from_cell(&cell(1, 2, 900, 70, 15, 15), &guards);
        assert!(!lopsided.passes_guards);
        assert!(
            lopsided
                .guard_failures
                .iter()
                .any(|f| f.contains("97%") && f.contains("5%–95%"))
        );

        let only_small = evaluate(&[cell(1, 1, 500, 5, 200, 300)], &guards);
        assert_eq!(only_small.chosen, None);
        assert_eq!(
            only_small.reason.as_deref(),
            Some("no candidate has at least 10 users in every cell")
        );
        let both = evaluate(
            &[cell(1, 1, 500, 5, 200, 300), cell(1, 2, 900, 70, 15, 15)],
            &guards,
        );
        assert_eq!(
            both.reason.as_deref(),
            Some("every candidate with enough users has a share above threshold outside 5%–95%")
        );
    }

    #[test]
    fn argmax_picks_planted_best_among_grid() {
        let mut cells = Vec::new();
        for times in 1..=10u32 {
            for days in 1..=15u32 {
                // Strength falls off with distance from the planted (4, 9).
                let distance = u64::from(times.abs_diff(4) + days.abs_diff(9));
                let signal = 100u64.saturating_sub(8 * distance).max(10);
                cells.push(cell(
                    times,
                    days,
                    100 + signal,
                    100 - signal / 2,
                    100 - signal / 2,
                    100 + signal,
                ));
            }
        }
        // A stronger but guarded-out candidate must not win.
        cells.push(cell(11, 1, 500, 2, 2, 500));
        let evaluation = evaluate(&cells, &Guards::default());
        let chosen = evaluation.chosen.as_ref().map(|c| (c.times, c.days));
        assert_eq!(chosen, Some((4, 9)));
        assert_eq!(evaluation.reason, None);
        assert_eq!(
            (
                evaluation.candidates[0].times,
                evaluation.candidates[0].days
            ),
            (11, 1)
        );
        let phis: Vec<f64> = evaluation.candidates.iter().filter_map(|c| c.phi).collect();
        assert!(phis.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn ties_prefer_fewer_times_then_fewer_days() {
        let cells = [
            cell(3, 7, 40, 10, 20, 30),
            cell(2, 9, 40, 10, 20, 30),
            cell(2, 8, 40, 10, 20, 30),
        ];
        let evaluation = evaluate(&cells, &Guards::default());
        assert_eq!(evaluation.chosen.map(|c| (c.times, c.days)), Some((2, 8)));
    }

    #[test]
    fn undefined_cases_do_not_panic() {
        let guards = Guards::default();
        let nobody_above = Candidate::from_cell(&cell(9, 1, 0, 0, 30, 70), &guards);
        assert_eq!(nobody_above.retention_above, None);
        assert_eq!(nobody_above.lift, None);
        assert_eq!(nobody_above.phi, None);
        assert_eq!(nobody_above.phi_ci_low, None);
        assert!(!nobody_above.passes_guards);

        let tiny = Candidate::from_cell(
            &cell(1, 1, 1, 0, 0, 1),
            &Guards {
                min_cell: 0,
                ..guards.clone()
            },
        );
        assert_eq!(tiny.phi, Some(1.0));
        assert_eq!((tiny.phi_ci_low, tiny.phi_ci_high), (None, None));

        let empty = Candidate::from_cell(&cell(1, 1, 0, 0, 0, 0), &guards);
        assert_eq!(empty.share_above, 0.0);
        assert_eq!(empty.phi, None);

        let evaluation = evaluate(&[cell(9, 1, 0, 0, 30, 70), cell(1, 1, 0, 0, 0, 0)], &guards);
        assert_eq!(evaluation.chosen, None);
        assert!(evaluation.reason.is_some());
        assert_eq!(evaluation.candidates.last().and_then(|c| c.phi), None);
        let none = evaluate(&[], &guards);
        assert!(none.reason.unwrap_or_default().contains("no candidates"));
    }

    /// 991 of 2000 is 49.55% exactly, which a float holds a hair below: every formatter says
    /// 49.6%, as a person rounding the share would.
    #[test]
    fn every_formatter_rounds_a_share_the_same_way() {
        let share = 991.0 / 2000.0;
        assert_eq!(percent_tenths(share), "49.6%");
        assert_eq!(percent(share), "49.6%");
        assert_eq!(percent(0.05), "5%");
        assert_eq!(percent_tenths(0.05), "5.0%");
    }
}
