//! Activation ("aha") thresholds: which "at least x times within y days of signup" of the North
//! Star event best separates retained from churned users, recomputed from the history.
//!
//! - [`analysis`]: the DataFusion SQL (`queries/activation/histogram.sql`) and the cells;
//! - [`stats`]: share, retention, lift, sensitivity, specificity, phi with a Fisher-z interval,
//!   and the guarded argmax;
//! - [`plot`]: the picture (phi over the grid; retention above vs below);
//! - [`store`]: versioned results (table `activation`), the current threshold;
//! - [`northstar`]: the North Star Metric's daily series at the current threshold;
//! - [`generate`]: a synthetic history with a planted threshold, for tests, demos and benchmarks.

pub mod analysis;
pub mod generate;
pub mod northstar;
pub mod plot;
pub mod stats;
pub mod store;

pub use analysis::{Analysis, AnalysisError, Question};
pub use store::{ActivationStore, Version};

use crate::query::QueryEngine;

/// Runs the analysis and records it as a new version (with its picture). `progress` is told
/// each step; the CLI shows it as a progress bar.
pub async fn recompute(
    engine: &QueryEngine,
    question: &Question,
    store: &ActivationStore,
    as_of: Option<i64>,
    now: i64,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(Analysis, Version), AnalysisError> {
    let analysis = analysis::run(engine, question, as_of, progress).await?;
    progress("drawing and storing the result");
    let counted = plot::Counted {
        cohort: analysis.cohort,
        as_of: &analysis.as_of,
    };
    let svg = plot::report_svg(&analysis.evaluation, &question.north_star_event, counted);
    let version = store.record(&analysis, now, &svg).map_err(|message| {
        AnalysisError::Query(crate::query::QueryError::Internal(format!(
            "storing the result: {message}"
        )))
    })?;
    Ok((analysis, version))
}
