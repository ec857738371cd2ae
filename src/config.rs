//! The configuration file (`schemas/northstar.json`): the seed's template as a strict superset.
//!
//! Two stages, as in GreptimeDB: serde structs that mirror the JSON (camelCase, defaults for
//! everything the seed does not set, unknown keys refused with their path), then
//! [`Config::validate`] for the rules that span sections (a meter must name a usage feature, a
//! write key must belong to one source only, …). Only a validated [`Config`] leaves this module.

mod duration;
pub mod schemaver;
mod sections;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub(crate) use duration::format_duration;
pub use duration::{HumanDuration, parse_duration};
pub use sections::*;

use serde::{Deserialize, Serialize};

/// Why a config could not be loaded. Always the user's fault, never retryable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file we tried.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The JSON does not fit the schema; `at` is the key path such as `events[1].metering.unit`.
    #[error("config {origin}: {at}: {message}")]
    Invalid {
        /// File name or `<inline>`.
        origin: String,
        /// Key path of the offending value (`.` for the root).
        at: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Version of the event schema as a whole (the seed's `schemaVersion`).
    #[serde(default = "default_schema_version")]
    pub schema_version: String,
    /// The North Star Metric: the one behaviour that predicts retention.
    #[serde(default)]
    pub north_star_metric: Option<NorthStarMetric>,
    /// Planned events: their properties, triggers and meters.
    #[serde(default)]
    pub events: Vec<EventSpec>,
    /// Features that are metered and limited per plan.
    #[serde(default)]
    pub usage_features: Vec<UsageFeature>,
    /// Where events come from, each with its write keys.
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    /// Request and message size bounds of the ingest API.
    #[serde(default)]
    pub ingest: IngestSettings,
    /// The JetStream stream that is the log of record.
    #[serde(default)]
    pub stream: StreamSettings,
    /// How the archiver rolls and compacts Parquet files.
    #[serde(default)]
    pub archive: ArchiveSettings,
    /// The free space kept on the disks northstar writes to.
    #[serde(default)]
    pub storage: StorageSettings,
    /// Limits of the SQL API.
    #[serde(default)]
    pub sql: SqlSettings,
    /// Metering, plans and the limits API.
    #[serde(default)]
    pub metering: MeteringSettings,
    /// Keys of services that call the limits API (check, usage, entitlements).
    #[serde(default)]
    pub service_keys: Vec<String>,
    /// Read-only keys of analysts: SQL over HTTP and the Postgres wire, nothing that writes.
    #[serde(default)]
    pub analyst_keys: Vec<String>,
    /// Schema registry defaults.
    #[serde(default)]
    pub registry: RegistrySettings,
    /// The activation ("aha") analysis.
    #[serde(default)]
    pub activation: ActivationSettings,
    /// The onboarding engine and triggers.
    #[serde(default)]
    pub onboarding: OnboardingSettings,
    /// The identity graph (which ids are one person).
    #[serde(default)]
    pub identity: IdentitySettings,
    /// Feature flags.
    #[serde(default)]
    pub flags: Vec<FlagSpec>,
    /// The billing sink and the upgrade path (absent: usage is metered, not billed).
    #[serde(default)]
    pub billing: Option<BillingSettings>,
}

fn default_schema_version() -> String {
    "1.0.0".into()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            schema_version: default_schema_version(),
            north_star_metric: None,
            events: Vec::new(),
            usage_features: Vec::new(),
            sources: Vec::new(),
            ingest: IngestSettings::default(),
            stream: StreamSettings::default(),
            archive: ArchiveSettings::default(),
            storage: StorageSettings::default(),
            sql: SqlSettings::default(),
            metering: MeteringSettings::default(),
            service_keys: Vec::new(),
            analyst_keys: Vec::new(),
            registry: RegistrySettings::default(),
            activation: ActivationSettings::default(),
            onboarding: OnboardingSettings::default(),
            identity: IdentitySettings::default(),
            flags: Vec::new(),
            billing: None,
        }
    }
}

/// Requests of `ingest.maxBatchBytes` a stream's `maxBytes` must hold at least.
const REQUESTS_PER_STREAM: i64 = 4;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in error messages.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let config: Config =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                let at = err.path().to_string();
                ConfigError::Invalid {
                    origin: origin.to_string(),
                    at,
                    message: err.inner().to_string(),
                }
            })?;
        config
            .validate()
            .map_err(|(at, message)| ConfigError::Invalid {
                origin: origin.to_string(),
                at,
                message,
            })?;
        Ok(config)
    }

    /// Adds the write key from `NORTHSTAR_WRITE_KEY` to a source named `default`.
    pub fn add_default_write_key(&mut self, key: &str) {
        let key = key.trim();
        if key.is_empty()
            || self
                .sources
                .iter()
                .any(|s| s.write_keys.iter().any(|k| k == key))
        {
            return;
        }
        match self.sources.iter_mut().find(|s| s.name == "default") {
            Some(source) => source.write_keys.push(key.to_string()),
            None => self.sources.push(SourceSpec {
                name: "default".into(),
                write_keys: vec![key.to_string()],
            }),
        }
    }

    /// Every plan the config knows: the default plan and each plan named in a feature's limits.
    pub fn known_plans(&self) -> std::collections::BTreeSet<&str> {
        let mut plans: std::collections::BTreeSet<&str> = self
            .usage_features
            .iter()
            .flat_map(|f| f.limits.keys().map(String::as_str))
            .collect();
        plans.insert(self.metering.default_plan.as_str());
        plans
    }

    /// The spec of a planned event, if the config names it.
    pub fn event(&self, name: &str) -> Option<&EventSpec> {
        self.events.iter().find(|e| e.name == name)
    }

    /// Rules that span sections; the error is `(key path, message)`.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let mut names = HashSet::new();
        for (i, event) in self.events.iter().enumerate() {
            if event.name.trim().is_empty() {
                return Err((format!("events[{i}].name"), "must not be empty".into()));
            }
            if !names.insert(event.name.as_str()) {
                return Err((
                    format!("events[{i}].name"),
                    format!("event `{}` is listed twice", event.name),
                ));
            }
            if let Some(rate) = event.sample_rate {
                if !(rate > 0.0 && rate <= 1.0) {
                    return Err((
                        format!("events[{i}].sampleRate"),
                        "must be in (0, 1]".into(),
                    ));
                }
                if event.metering.is_some() && rate < 1.0 {
                    return Err((
                        format!("events[{i}].sampleRate"),
                        "a metered event is never sampled: usage and bills must count every event"
                            .into(),
                    ));
                }
            }
            if let Some(version) = &event.version
                && schemaver::SchemaVer::parse(version).is_none()
            {
                return Err((
                    format!("events[{i}].version"),
                    format!("`{version}` is not SchemaVer MODEL-REVISION-ADDITION (e.g. 1-0-0)"),
                ));
            }
            if let Some(meter) = &event.metering
                && !self.usage_features.iter().any(|f| f.id == meter.feature_id)
            {
                return Err((
                    format!("events[{i}].metering.featureId"),
                    format!("`{}` is not an id in usageFeatures", meter.feature_id),
                ));
            }
        }
        let mut feature_ids = HashSet::new();
        for (i, feature) in self.usage_features.iter().enumerate() {
            if feature.thresholds.contains(&0) {
                return Err((
                    format!("usageFeatures[{i}].thresholds"),
                    "each must be at least 1 unit".into(),
                ));
            }
            if feature.thresholds.len() + self.metering.thresholds.len() > 8 {
                return Err((
                    format!("usageFeatures[{i}].thresholds"),
                    "at most 8 thresholds a feature, metering.thresholds included".into(),
                ));
            }
        }
        for (i, feature) in self.usage_features.iter().enumerate() {
            if !feature_ids.insert(feature.id.as_str()) {
                return Err((
                    format!("usageFeatures[{i}].id"),
                    format!("feature `{}` is listed twice", feature.id),
                ));
            }
        }
        let per_counter = self.metering.max_unique_values_per_counter;
        for (i, feature) in self.usage_features.iter().enumerate() {
            let counts_unique = self
                .events
                .iter()
                .filter_map(|e| e.metering.as_ref())
                .any(|m| m.feature_id == feature.id && m.aggregation == Aggregation::UniqueCount);
            let bounds = feature
                .limits
                .iter()
                .filter_map(|(plan, limit)| Some(("limits", plan, (*limit)?)))
                .chain(
                    feature
                        .hard_caps
                        .iter()
                        .map(|(plan, cap)| ("hardCaps", plan, *cap)),
                );
            for (key, plan, bound) in bounds {
                if counts_unique && bound > per_counter {
                    return Err((
                        format!("usageFeatures[{i}].{key}.{plan}"),
                        format!(
                            "{bound} is above metering.maxUniqueValuesPerCounter ({per_counter}): a unique_count counter holds no more values than that, so it could never reach this"
                        ),
                    ));
                }
            }
            for plan in feature.soft_limits.iter().chain(feature.hard_caps.keys()) {
                if !feature.limits.contains_key(plan) {
                    return Err((
                        format!("usageFeatures[{i}]"),
                        format!(
                            "plan `{plan}` has a soft limit or hard cap but no entry in limits"
                        ),
                    ));
                }
            }
        }
        for (i, key) in self.service_keys.iter().enumerate() {
            if key.len() < 16 {
                return Err((
                    format!("serviceKeys[{i}]"),
                    "service keys must be at least 16 characters".into(),
                ));
            }
        }
        for (i, key) in self.analyst_keys.iter().enumerate() {
            if key.len() < 16 {
                return Err((
                    format!("analystKeys[{i}]"),
                    "analyst keys must be at least 16 characters".into(),
                ));
            }
        }
        let mut keys: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, source) in self.sources.iter().enumerate() {
            if source.name.trim().is_empty() {
                return Err((format!("sources[{i}].name"), "must not be empty".into()));
            }
            for (j, key) in source.write_keys.iter().enumerate() {
                if key.len() < 8 {
                    return Err((
                        format!("sources[{i}].writeKeys[{j}]"),
                        "write keys must be at least 8 characters".into(),
                    ));
                }
                if let Some(other) = keys.insert(key, &source.name) {
                    return Err((
                        format!("sources[{i}].writeKeys[{j}]"),
                        format!("this key is already a write key of source `{other}`"),
                    ));
                }
            }
        }
        self.ingest
            .validate()
            .map_err(|(at, m)| (format!("ingest.{at}"), m))?;
        self.stream
            .validate()
            .map_err(|(at, m)| (format!("stream.{at}"), m))?;
        // Retention sheds ingest at 80% of a stream's bound, and a request with every reader
        // caught up is always taken: a bound must hold several requests as stored (a message
        // takes up to about twice its share of the body once normalised).
        let requests = i64::try_from(self.ingest.max_batch_bytes)
            .unwrap_or(i64::MAX)
            .saturating_mul(REQUESTS_PER_STREAM);
        if self.stream.max_bytes > 0 && self.stream.max_bytes < requests {
            return Err((
                "stream.maxBytes".into(),
                format!(
                    "{} bytes holds fewer than {REQUESTS_PER_STREAM} requests of ingest.maxBatchBytes ({} bytes): at least {requests}, or a smaller maxBatchBytes",
                    self.stream.max_bytes, self.ingest.max_batch_bytes
                ),
            ));
        }
        self.archive
            .validate()
            .map_err(|(at, m)| (format!("archive.{at}"), m))?;
        self.storage
            .validate()
            .map_err(|(at, m)| (format!("storage.{at}"), m))?;
        self.sql
            .validate()
            .map_err(|(at, m)| (format!("sql.{at}"), m))?;
        self.metering
            .validate()
            .map_err(|(at, m)| (format!("metering.{at}"), m))?;
        self.activation
            .validate()
            .map_err(|(at, m)| (format!("activation.{at}"), m))?;
        if self.identity.max_ids == 0 {
            return Err((
                "identity.maxIds".into(),
                "must be at least 1: it bounds the ids the identity graph records".into(),
            ));
        }
        if self.identity.max_erasures == 0 {
            return Err((
                "identity.maxErasures".into(),
                "must be at least 1: it bounds the erasure log".into(),
            ));
        }
        if self.onboarding.max_people == 0 {
            return Err(("onboarding.maxPeople".into(), "must be at least 1".into()));
        }
        let mut step_ids = HashSet::new();
        for (i, step) in self.onboarding.steps.iter().enumerate() {
            if !step_ids.insert(step.id.as_str()) {
                return Err((
                    format!("onboarding.steps[{i}].id"),
                    format!("step `{}` is listed twice", step.id),
                ));
            }
        }
        if let Some(billing) = &self.billing {
            billing
                .validate()
                .map_err(|(at, m)| (format!("billing.{at}"), m))?;
            for feature in billing.meters.keys() {
                let metered = self
                    .events
                    .iter()
                    .filter_map(|e| e.metering.as_ref())
                    .find(|m| &m.feature_id == feature);
                match metered.map(|m| m.aggregation) {
                    None => {
                        return Err((
                            format!("billing.meters.{feature}"),
                            format!("`{feature}` is not a feature any event meters"),
                        ));
                    }
                    Some(Aggregation::Sum | Aggregation::Count) => {}
                    Some(other) => {
                        return Err((
                            format!("billing.meters.{feature}"),
                            format!(
                                "only sum and count meters are billed by window; `{feature}` aggregates by {other:?}"
                            ),
                        ));
                    }
                }
            }
            for plan in billing.checkout.prices.keys() {
                if !self.known_plans().contains(plan.as_str()) {
                    return Err((
                        format!("billing.checkout.prices.{plan}"),
                        format!("`{plan}` is not a plan named in any feature's limits"),
                    ));
                }
            }
        }
        let mut flag_keys = HashSet::new();
        for (i, flag) in self.flags.iter().enumerate() {
            if !flag_keys.insert(flag.key.as_str()) {
                return Err((
                    format!("flags[{i}].key"),
                    format!("flag `{}` is listed twice", flag.key),
                ));
            }
            if !(0.0..=1.0).contains(&flag.rollout) {
                return Err((
                    format!("flags[{i}].rollout"),
                    "must be between 0 and 1".into(),
                ));
            }
            let mut variant_keys = HashSet::new();
            for (j, variant) in flag.variants.iter().enumerate() {
                if variant.key.is_empty() || !variant_keys.insert(variant.key.as_str()) {
                    return Err((
                        format!("flags[{i}].variants[{j}].key"),
                        "must be non-empty and not listed twice".into(),
                    ));
                }
                if !(0.0..=1.0).contains(&variant.share) {
                    return Err((
                        format!("flags[{i}].variants[{j}].share"),
                        "must be between 0 and 1".into(),
                    ));
                }
            }
            let shares: f64 = flag.variants.iter().map(|v| v.share).sum();
            if !flag.variants.is_empty() && (shares - 1.0).abs() > 1e-9 {
                return Err((
                    format!("flags[{i}].variants"),
                    format!("the variants' shares sum to {shares}; they must sum to 1"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../tests/fixtures/config-template.json");

    #[test]
    fn accepts_the_seed_template_as_it_stands() {
        let config = Config::from_json(SEED, "seed").unwrap();
        assert_eq!(
            config.north_star_metric.as_ref().unwrap().event,
            "core_action_completed"
        );
        assert_eq!(config.events.len(), 2);
        let meter = config
            .event("api_call_made")
            .unwrap()
            .metering
            .as_ref()
            .unwrap();
        assert_eq!(meter.feature_id, "api_requests");
        assert_eq!(config.usage_features[0].limits["pro"], Some(50000));
        assert_eq!(config.stream.duplicate_window.get().as_secs(), 86400);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let text = SEED.replace(
            "\"unit\": \"request\"",
            "\"unit\": \"request\", \"colour\": 1",
        );
        let err = Config::from_json(&text, "x.json").unwrap_err().to_string();
        assert!(err.contains("events[1].metering"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn a_meter_must_name_a_usage_feature() {
        let text = SEED.replace("\"featureId\": \"api_requests\"", "\"featureId\": \"nope\"");
        let err = Config::from_json(&text, "x.json").unwrap_err().to_string();
        assert!(err.contains("events[1].metering.featureId"), "{err}");
    }

    #[test]
    fn a_unique_count_limit_must_fit_in_one_counter() {
        let config = |limit: u64, cap: u64| {
            serde_json::json!({
                "events": [{"name": "seat_used", "metering":
                    {"featureId": "seats", "aggregation": "unique_count", "valueProperty": "member"}}],
                "usageFeatures": [{"id": "seats", "limits": {"free": limit, "pro": null},
                                   "hardCaps": {"free": cap}}],
                "metering": {"maxUniqueValuesPerCounter": 100}
            })
            .to_string()
        };
        let err = Config::from_json(&config(101, 50), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("usageFeatures[0].limits.free"), "{err}");
        assert!(err.contains("maxUniqueValuesPerCounter"), "{err}");
        let err = Config::from_json(&config(10, 500), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("usageFeatures[0].hardCaps.free"), "{err}");
        assert!(Config::from_json(&config(100, 100), "x").is_ok());
    }

    #[test]
    fn a_flags_variants_are_named_once_and_share_everyone() {
        let config = |variants: serde_json::Value| {
            serde_json::json!({"flags": [{"key": "checkout", "variants": variants}]}).to_string()
        };
        let halves = serde_json::json!([{"key": "a", "share": 0.5}, {"key": "b", "share": 0.5}]);
        assert!(Config::from_json(&config(halves), "x").is_ok());
        let short = serde_json::json!([{"key": "a", "share": 0.5}, {"key": "b", "share": 0.4}]);
        let err = Config::from_json(&config(short), "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flags[0].variants") && err.contains("sum to 1"),
            "{err}"
        );
        let twice = serde_json::json!([{"key": "a", "share": 0.5}, {"key": "a", "share": 0.5}]);
        let err = Config::from_json(&config(twice), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flags[0].variants[1].key"), "{err}");
    }

    #[test]
    fn a_retention_keeps_whole_days_or_everything() {
        let config =
            |kept: &str| format!(r#"{{"archive": {{"retention": {{"events": "{kept}"}}}}}}"#);
        assert!(Config::from_json(&config("30d"), "x").is_ok());
        assert!(Config::from_json(&config("0"), "x").is_ok());
        let err = Config::from_json(&config("12h"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("archive.retention.events"), "{err}");
    }

    #[test]
    fn a_stream_must_hold_several_requests() {
        let small = r#"{"stream": {"maxBytes": 1048576}}"#;
        let err = Config::from_json(small, "x").unwrap_err().to_string();
        assert!(err.contains("stream.maxBytes"), "{err}");
        assert!(err.contains("ingest.maxBatchBytes"), "{err}");
        let fits = r#"{"stream": {"maxBytes": 1048576}, "ingest": {"maxBatchBytes": 262144}}"#;
        assert!(Config::from_json(fits, "x").is_ok());
        assert!(Config::from_json(r#"{"stream": {"maxBytes": -1}}"#, "x").is_ok());
    }

    #[test]
    fn bad_durations_name_the_field() {
        let err = Config::from_json(r#"{"stream": {"duplicateWindow": "a day"}}"#, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stream.duplicateWindow"), "{err}");
    }

    #[test]
    fn the_env_write_key_joins_the_default_source() {
        let mut config = Config::default();
        config.add_default_write_key("wk_from_env_1");
        config.add_default_write_key("wk_from_env_1");
        assert_eq!(config.sources.len(), 1);
        assert_eq!(config.sources[0].name, "default");
        assert_eq!(config.sources[0].write_keys, vec!["wk_from_env_1"]);
    }
}
