//! Quantities of metered events: exact decimals, never floats that drift.

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::config::Aggregation;
use crate::json::JsonObject;
use crate::rejected::Rejection;

/// Most decimal places a metered quantity may have: what SQL's `metered_events` view keeps
/// (`DECIMAL(38, 10)`), so the meter and SQL count the same.
pub(crate) const MAX_QUANTITY_SCALE: u32 = 10;

/// What one event contributes to a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contribution {
    /// A number (sum, max, latest; `count` contributes one).
    Amount(Decimal),
    /// A value counted once per period (`unique_count`).
    Distinct(String),
}

/// The contribution of an event's properties to a meter.
pub fn quantity(
    value_property: Option<&str>,
    aggregation: Aggregation,
    properties: &Map<String, Value>,
) -> Result<Contribution, Rejection> {
    let value = value_property.and_then(|p| properties.get(p));
    quantity_of(value_property, aggregation, value)
}

/// The contribution to a meter of `value`, the value of its `value_property`.
pub(crate) fn quantity_of(
    value_property: Option<&str>,
    aggregation: Aggregation,
    value: Option<&Value>,
) -> Result<Contribution, Rejection> {
    let Some(property) = value_property else {
        return Ok(Contribution::Amount(Decimal::ONE));
    };
    if aggregation == Aggregation::Count {
        return Ok(Contribution::Amount(Decimal::ONE));
    }
    let field = format!("properties.{property}");
    let value = value.filter(|v| !v.is_null());
    if aggregation == Aggregation::UniqueCount {
        return match value {
            Some(Value::String(s)) if !s.is_empty() => Ok(Contribution::Distinct(s.clone())),
            Some(Value::Number(n)) => Ok(Contribution::Distinct(n.to_string())),
            _ => Err(Rejection::new(
                field,
                "is required: the value this meter counts once per period",
            )),
        };
    }
    let amount = match value {
        None => {
            return Err(Rejection::new(
                field,
                "is required: it is this meter's quantity",
            ));
        }
        Some(Value::Number(n)) => parse_decimal(&n.to_string()),
        Some(Value::String(s)) => parse_decimal(s.trim()),
        Some(_) => None,
    }
    .ok_or_else(|| Rejection::new(&field, "must be a number (the meter's quantity)"))?;
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(Rejection::new(field, "must not be negative"));
    }
    Ok(Contribution::Amount(amount))
}

/// Checks a quantity accepted at the door (ingest, `/v1/check`) against the bounds the
/// meter keeps exact: at most `max`, at most [`MAX_QUANTITY_SCALE`] decimal places.
pub(crate) fn within_bounds(
    contribution: &Contribution,
    max: u64,
    value_property: Option<&str>,
) -> Result<Contribution, Rejection> {
    if let Contribution::Amount(amount) = contribution {
        let field =
            value_property.map_or_else(|| "quantity".to_string(), |p| format!("properties.{p}"));
        amount_within_bounds(*amount, max, &field)?;
    }
    Ok(contribution.clone())
}

/// [`within_bounds`] for one amount, naming `field`.
pub(crate) fn amount_within_bounds(
    amount: Decimal,
    max: u64,
    field: &str,
) -> Result<(), Rejection> {
    if amount > Decimal::from(max) {
        return Err(Rejection::new(
            field,
            format!("is {amount}; a metered quantity may be at most {max} (metering.maxQuantity)"),
        ));
    }
    if amount.normalize().scale() > MAX_QUANTITY_SCALE {
        return Err(Rejection::new(
            field,
            format!(
                "has more than {MAX_QUANTITY_SCALE} decimal places; the meter and SQL keep {MAX_QUANTITY_SCALE}"
            ),
        ));
    }
    Ok(())
}

/// Exact decimal from JSON number text (`12`, `0.001`, `1e3`); floats never enter.
pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    text.parse::<Decimal>()
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
        .map(|d| d.normalize())
}

/// The series key of an event for a meter with `group_by` (empty without one).
pub(crate) fn group_key(group_by: &[String], properties: &dyn JsonObject) -> String {
    group_by
        .iter()
        .map(|p| match properties.field(p).as_deref() {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn quantities_are_exact_decimals() {
        let m = Some("gb");
        let q = |v: Value| quantity(m, Aggregation::Sum, &props(json!({"gb": v})));
        assert_eq!(
            q(json!(0.1)).unwrap(),
            Contribution::Amount("0.1".parse().unwrap())
        );
        assert_eq!(
            q(json!("2.50")).unwrap(),
            Contribution::Amount("2.5".parse().unwrap())
        );
        assert_eq!(
            q(json!(1e3)).unwrap(),
            Contribution::Amount(Decimal::from(1000))
        );
        assert_eq!(q(json!(-1)).unwrap_err().message, "must not be negative");
        assert_eq!(q(json!("lots")).unwrap_err().field, "properties.gb");
        assert!(q(json!([1])).is_err());
        let missing = quantity(m, Aggregation::Sum, &props(json!({}))).unwrap_err();
        assert!(missing.message.contains("required"));
    }

    #[test]
    fn quantities_past_the_bounds_are_refused_with_the_property_named() {
        let bounded = |v: &str| {
            let amount = Contribution::Amount(parse_decimal(v).unwrap());
            within_bounds(&amount, 1_000, Some("gb"))
        };
        assert!(bounded("1000").is_ok());
        assert!(bounded("0.0000000001").is_ok(), "ten places");
        let big = bounded("79228162514264337593543950335").unwrap_err();
        assert_eq!(big.field, "properties.gb");
        assert!(big.message.contains("at most 1000"), "{}", big.message);
        let fine = bounded("0.00000000001").unwrap_err();
        assert!(fine.message.contains("decimal places"), "{}", fine.message);
        let distinct = Contribution::Distinct("x".into());
        assert!(within_bounds(&distinct, 1, None).is_ok());
    }

    #[test]
    fn without_a_value_property_each_event_is_one() {
        let q = quantity(None, Aggregation::Sum, &Map::new()).unwrap();
        assert_eq!(q, Contribution::Amount(Decimal::ONE));
    }

    #[test]
    fn unique_counts_take_the_value_itself() {
        let m = Some("user");
        let q = quantity(m, Aggregation::UniqueCount, &props(json!({"user": "u1"}))).unwrap();
        assert_eq!(q, Contribution::Distinct("u1".into()));
    }
}
