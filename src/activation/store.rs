//! Versioned activation results: `data/activation/history.json` (every version), the table
//! `activation` (`data/activation/activation.parquet`: every candidate of every version), and a
//! picture per version (`data/activation/v<N>.svg`). The current threshold is the latest
//! version that chose one: it replaces `northStarMetric.threshold` at run time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array, UInt64Array,
};
use serde::{Deserialize, Serialize};

use super::analysis::Analysis;
use super::stats::Candidate;
use crate::catalog::{ACTIVATION, activation_schema};

/// One recomputation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    /// 1, 2, 3, …
    pub version: u32,
    /// When it was computed (RFC 3339).
    pub computed_at: String,
    /// End of the data the cohort was judged against (RFC 3339).
    pub as_of: String,
    /// Name of the North Star event this version counted.
    pub event: String,
    /// Name of the signup event this version counted from.
    pub signup_event: String,
    /// People in the cohort.
    pub cohort: u64,
    /// The chosen candidate (argmax phi within the guards), if any.
    pub chosen: Option<Candidate>,
    /// Why nothing was chosen.
    pub reason: Option<String>,
    /// The best candidates by phi (at most 20).
    pub top: Vec<Candidate>,
}

/// The results, on disk and in memory.
pub struct ActivationStore {
    dir: PathBuf,
    versions: RwLock<(Vec<Version>, Option<std::time::SystemTime>)>,
}

impl ActivationStore {
    /// Opens the results of `data_dir` (none yet is fine).
    pub fn open(data_dir: &Path) -> Arc<Self> {
        let store = Arc::new(Self {
            dir: data_dir.join(ACTIVATION.dir),
            versions: RwLock::new((Vec::new(), None)),
        });
        store.refresh();
        store
    }

    /// Reloads the history if another process (`northstar aha`) wrote a new version.
    fn refresh(&self) {
        let path = self.dir.join("history.json");
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let stale = self
            .versions
            .read()
            .map(|v| v.1 != modified)
            .unwrap_or(false);
        if stale
            && let Some(versions) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<Version>>(&b).ok())
            && let Ok(mut guard) = self.versions.write()
        {
            *guard = (versions, modified);
        }
    }

    /// Every version, oldest first.
    pub fn history(&self) -> Vec<Version> {
        self.refresh();
        self.versions
            .read()
            .map(|v| v.0.clone())
            .unwrap_or_default()
    }

    /// The latest version that chose a threshold.
    pub fn current(&self) -> Option<Version> {
        self.history()
            .into_iter()
            .rev()
            .find(|v| v.chosen.is_some())
    }

    /// The current "(at least x times, within y days)", if any.
    pub fn current_threshold(&self) -> Option<(u32, u32)> {
        self.current()
            .and_then(|v| v.chosen)
            .map(|c| (c.times, c.days))
    }

    /// Records a new version: history, table and picture, each written atomically.
    pub fn record(
        &self,
        analysis: &Analysis,
        computed_at: i64,
        svg: &str,
    ) -> Result<Version, String> {
        self.refresh();
        let mut guard = self
            .versions
            .write()
            .map_err(|_| "activation store lock poisoned".to_string())?;
        let versions = &guard.0;
        let version = Version {
            version: versions.last().map(|v| v.version + 1).unwrap_or(1),
            computed_at: crate::clock::format_micros(computed_at),
            as_of: analysis.as_of.clone(),
            event: analysis.question.north_star_event.clone(),
            signup_event: analysis.question.signup_event.clone(),
            cohort: analysis.cohort,
            chosen: analysis.evaluation.chosen.clone(),
            reason: analysis.evaluation.reason.clone(),
            top: analysis
                .evaluation
                .candidates
                .iter()
                .take(20)
                .cloned()
                .collect(),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let mut next = versions.clone();
        next.push(version.clone());
        crate::files::write_atomic(
            &self.dir.join(format!("v{}.svg", version.version)),
            svg.as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        self.write_table(&next, analysis, computed_at)?;
        let history = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        let path = self.dir.join("history.json");
        crate::files::write_atomic(&path, &history).map_err(|e| e.to_string())?;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        *guard = (next, modified);
        Ok(version)
    }

    /// The path of a version's picture.
    pub fn picture(&self, version: u32) -> PathBuf {
        self.dir.join(format!("v{version}.svg"))
    }

    /// Rewrites the table: every candidate of the latest version, the top ones of the others.
    fn write_table(
        &self,
        versions: &[Version],
        latest: &Analysis,
        computed_at: i64,
    ) -> Result<(), String> {
        let path = self.dir.join("activation.parquet");
        let mut rows: Vec<(u32, i64, String, Candidate, bool)> = Vec::new();
        // Older versions keep their top candidates from the history; the latest has them all.
        for version in &versions[..versions.len().saturating_sub(1)] {
            let at = chrono::DateTime::parse_from_rfc3339(&version.computed_at)
                .map(|t| t.timestamp_micros())
                .unwrap_or(0);
            for candidate in &version.top {
                let chosen = version
                    .chosen
                    .as_ref()
                    .is_some_and(|c| c.times == candidate.times && c.days == candidate.days);
                rows.push((
                    version.version,
                    at,
                    version.event.clone(),
                    candidate.clone(),
                    chosen,
                ));
            }
        }
        let number = versions.last().map(|v| v.version).unwrap_or(1);
        for candidate in &latest.evaluation.candidates {
            let chosen = latest
                .evaluation
                .chosen
                .as_ref()
                .is_some_and(|c| c.times == candidate.times && c.days == candidate.days);
            rows.push((
                number,
                computed_at,
                latest.question.north_star_event.clone(),
                candidate.clone(),
                chosen,
            ));
        }
        let schema = activation_schema();
        let f64s = |f: &dyn Fn(&Candidate) -> Option<f64>| -> ArrayRef {
            Arc::new(rows.iter().map(|r| f(&r.3)).collect::<Float64Array>())
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(rows.iter().map(|r| r.0).collect::<UInt32Array>()),
            Arc::new(
                TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.2.as_str()))
                    .collect::<StringArray>(),
            ),
            Arc::new(rows.iter().map(|r| r.3.times).collect::<UInt32Array>()),
            Arc::new(rows.iter().map(|r| r.3.days).collect::<UInt32Array>()),
            Arc::new(rows.iter().map(|r| r.3.a).collect::<UInt64Array>()),
            Arc::new(rows.iter().map(|r| r.3.b).collect::<UInt64Array>()),
            Arc::new(rows.iter().map(|r| r.3.c).collect::<UInt64Array>()),
            Arc::new(rows.iter().map(|r| r.3.d).collect::<UInt64Array>()),
            f64s(&|c| Some(c.share_above)),
            f64s(&|c| c.retention_above),
            f64s(&|c| c.retention_below),
            f64s(&|c| c.lift),
            f64s(&|c| c.sensitivity),
            f64s(&|c| c.specificity),
            f64s(&|c| c.phi),
            f64s(&|c| c.phi_ci_low),
            f64s(&|c| c.phi_ci_high),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.3.passes_guards))
                    .collect::<BooleanArray>(),
            ),
            Arc::new(rows.iter().map(|r| Some(r.4)).collect::<BooleanArray>()),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
        let properties =
            crate::archive::commit::writer_properties(&schema, &["version"], 3, 128 * 1024);
        crate::archive::commit::write_parquet_file(&path, &schema, [&batch], properties)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
