//! Meters compiled from the config: which events count against which feature, and how.

use std::collections::HashMap;

use crate::config::{Aggregation, Config, PeriodKind};

/// A metered feature and its limits.
#[derive(Debug, Clone)]
pub struct Feature {
    /// Feature id (`usageFeatures[].id`).
    pub id: String,
    /// How quantities combine within a period.
    pub aggregation: Aggregation,
    /// Unit name, for people.
    pub unit: Option<String>,
    /// Limit per plan; `None` inside means unlimited; a plan not listed has no access.
    pub limits: HashMap<String, Option<u64>>,
    /// Plans whose limit is soft.
    pub soft_plans: Vec<String>,
    /// Usage per plan at which the customer is suspended.
    pub hard_caps: HashMap<String, u64>,
    /// The event a `consume` records (the first event metering this feature).
    pub event: String,
    /// The property carrying the quantity, if any.
    pub value_property: Option<String>,
    /// Properties that split usage into series.
    pub group_by: Vec<String>,
    /// Usage (units this period) at which a threshold event is published, on any plan.
    pub thresholds: Vec<u64>,
}

/// The access a plan has to a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// The plan may not use the feature at all.
    None,
    /// Up to `limit` per period; past it refused (hard) or reported as overage (soft).
    Limited {
        /// Units per period.
        limit: u64,
        /// Soft limits allow more and report overage.
        soft: bool,
    },
    /// No limit.
    Unlimited,
}

impl Feature {
    /// What `plan` may use.
    pub fn allowance(&self, plan: &str) -> Allowance {
        match self.limits.get(plan) {
            None => Allowance::None,
            Some(None) => Allowance::Unlimited,
            Some(Some(limit)) => Allowance::Limited {
                limit: *limit,
                soft: self.soft_plans.iter().any(|p| p == plan),
            },
        }
    }
}

/// One way an event counts: the feature it meters and where its quantity is.
#[derive(Debug, Clone)]
pub struct EventMeter {
    /// Index into [`MeterSpec::features`].
    pub feature: usize,
    /// The property carrying the quantity (or, for `unique_count`, the value counted).
    pub value_property: Option<String>,
    /// Properties that split usage into series.
    pub group_by: Vec<String>,
}

/// Every meter of the config.
#[derive(Debug, Clone, Default)]
pub struct MeterSpec {
    /// Metered features, in config order.
    pub features: Vec<Feature>,
    /// Meters by event name.
    pub by_event: HashMap<String, Vec<EventMeter>>,
    /// Plan of customers nobody put on one.
    pub default_plan: String,
    /// Period of customers without one of their own.
    pub default_period: PeriodKind,
}

impl MeterSpec {
    /// Compiles the meters of a validated config. A feature no event meters is left out: it
    /// cannot be used.
    pub fn from_config(config: &Config) -> Self {
        let mut spec = Self {
            default_plan: config.metering.default_plan.clone(),
            default_period: config.metering.period,
            ..Default::default()
        };
        for event in &config.events {
            let Some(metering) = &event.metering else {
                continue;
            };
            let Some(usage) = config
                .usage_features
                .iter()
                .find(|f| f.id == metering.feature_id)
            else {
                continue;
            };
            let feature = match spec.features.iter().position(|f| f.id == usage.id) {
                Some(index) => index,
                None => {
                    spec.features.push(Feature {
                        id: usage.id.clone(),
                        aggregation: metering.aggregation,
                        unit: metering.unit.clone(),
                        limits: usage.limits.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                        soft_plans: usage.soft_limits.clone(),
                        hard_caps: usage
                            .hard_caps
                            .iter()
                            .map(|(k, v)| (k.clone(), *v))
                            .collect(),
                        event: event.name.clone(),
                        value_property: metering.value_property.clone(),
                        group_by: metering.group_by.clone(),
                        thresholds: usage.thresholds.clone(),
                    });
                    spec.features.len() - 1
                }
            };
            spec.by_event
                .entry(event.name.clone())
                .or_default()
                .push(EventMeter {
                    feature,
                    value_property: metering.value_property.clone(),
                    group_by: metering.group_by.clone(),
                });
        }
        spec
    }

    /// The feature with `id`.
    pub fn feature(&self, id: &str) -> Option<(usize, &Feature)> {
        self.features.iter().enumerate().find(|(_, f)| f.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_meters_api_calls() {
        let config = Config::from_json(
            include_str!("../../tests/fixtures/config-template.json"),
            "seed",
        )
        .unwrap();
        let spec = MeterSpec::from_config(&config);
        assert_eq!(spec.features.len(), 1);
        let (_, feature) = spec.feature("api_requests").unwrap();
        assert_eq!(feature.event, "api_call_made");
        assert_eq!(
            feature.allowance("free"),
            Allowance::Limited {
                limit: 1000,
                soft: false
            }
        );
        assert_eq!(feature.allowance("enterprise"), Allowance::None);
    }
}
