//! PostHog's flag endpoints, answered from northstar's own flags (config `flags`): what the
//! PostHog SDKs call for `isFeatureEnabled`, `getFeatureFlag` and `getAllFlags`.
//!
//! - `POST /flags/?v=2`: the current shape, one detailed entry per flag (posthog-node 5,
//!   posthog-python 6+, posthog-js).
//! - `POST /flags/` without `v=2`, and `POST /decide/`: the older shape, `featureFlags` with a
//!   value per key (older SDKs).
//!
//! - `GET /flags/definitions` (posthog-node 5) and `GET /api/feature_flag/local_evaluation`
//!   (older server SDKs): the definitions a server SDK evaluates locally, with a service key
//!   as the personal API key.
//!
//! The project token in the body (`token` or `api_key`) is a write key, as on the capture
//! routes; the distinct id resolves to its person through the identity graph, so a flag
//! answers the same for every id of one person.

use http::request::Parts;
use serde_json::{Map, Value, json};

use super::AppState;
use super::respond::{self, HttpResponse};
use crate::activation::northstar::Threshold;
use crate::ingest::{Encoding, IngestError};
use crate::onboarding::{FlagAnswer, FlagQuery, FlagReason};

/// Most bytes a flags request may decode to: a distinct id, groups and properties.
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Handles `POST /flags` and `POST /decide`.
pub async fn evaluate(state: &AppState, parts: &Parts, body: &[u8]) -> HttpResponse {
    let query = parts.uri.query().unwrap_or_default();
    let detailed = parts.uri.path().starts_with("/flags")
        && query.split('&').any(|pair| pair == "v=2" || pair == "v=3");
    let request = match read_request(parts, body) {
        Ok(request) => request,
        Err(error) => return respond::error(&error),
    };
    let Some(token) = request.token.as_deref() else {
        return respond::error(&IngestError::MissingKey);
    };
    if !state.ingestor.write_keys().is_key(token) {
        return respond::error(&IngestError::BadKey);
    }
    let fallback = Threshold::configured(&state.config);
    let answer =
        match state
            .onboarding
            .evaluate_flags(&request.distinct_id, fallback, &request.query)
        {
            Ok((_, answers)) if detailed => detailed_shape(&answers),
            Ok((_, answers)) => older_shape(&answers),
            // PostHog's own answer when it cannot compute flags: the SDK falls back to its
            // defaults and says so.
            Err(error) => {
                tracing::warn!(%error, "flags asked for a person onboarding does not follow");
                json!({"flags": {}, "featureFlags": {}, "featureFlagPayloads": {},
                   "errorsWhileComputingFlags": true})
            }
        };
    respond::json(200, &answer)
}

/// What a flags request asks.
#[derive(Debug)]
struct FlagsRequest {
    token: Option<String>,
    distinct_id: String,
    /// `flag_keys_to_evaluate` and `person_properties`.
    query: FlagQuery,
}

fn read_request(parts: &Parts, body: &[u8]) -> Result<FlagsRequest, IngestError> {
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let query = parts.uri.query().unwrap_or_default();
    let encoding = Encoding {
        gzip: header(http::header::CONTENT_ENCODING)
            .is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
            || query.contains("compression=gzip-js"),
        form: header(http::header::CONTENT_TYPE)
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded")),
        base64: query.contains("compression=base64"),
    };
    let bytes = crate::ingest::body::decode(body, &encoding, MAX_REQUEST_BYTES)?;
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(IngestError::InvalidJson(
            "the body must be a JSON object with `token` and `distinct_id`".into(),
        ));
    };
    let text = |key: &str| fields.get(key).and_then(Value::as_str).map(str::to_string);
    let token = text("token").or_else(|| text("api_key"));
    let distinct_id = match fields.get("distinct_id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => {
            return Err(IngestError::InvalidJson(
                "distinct_id: required, a non-empty string".into(),
            ));
        }
    };
    let keys = match fields.get("flag_keys_to_evaluate") {
        None | Some(Value::Null) => None,
        Some(Value::Array(keys)) => Some(
            keys.iter()
                .filter_map(|key| key.as_str().map(str::to_string))
                .collect(),
        ),
        Some(_) => {
            return Err(IngestError::InvalidJson(
                "flag_keys_to_evaluate: must be an array of flag keys".into(),
            ));
        }
    };
    let person_properties = match fields.get("person_properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(properties)) => properties.clone(),
        Some(_) => {
            return Err(IngestError::InvalidJson(
                "person_properties: must be an object".into(),
            ));
        }
    };
    let group_properties = match fields.get("group_properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(groups)) => groups.clone(),
        Some(_) => {
            return Err(IngestError::InvalidJson(
                "group_properties: must be an object of group type → properties".into(),
            ));
        }
    };
    Ok(FlagsRequest {
        token,
        distinct_id,
        query: FlagQuery {
            keys,
            person_properties,
            group_properties,
        },
    })
}

/// `/flags/?v=2`: `flags` by key, each with `enabled`, the reason and metadata.
fn detailed_shape(answers: &[FlagAnswer<'_>]) -> Value {
    let flags: Map<String, Value> = answers
        .iter()
        .map(|answer| {
            let (code, description) = match answer.reason {
                FlagReason::Targeted => ("condition_match", "Matched the flag's condition"),
                FlagReason::NotTargeted => ("no_condition_match", "No matching condition set"),
                FlagReason::OutOfRollout => {
                    ("out_of_rollout_bound", "Matched the condition, outside the rollout")
                }
            };
            // PostHog sends a payload as JSON text; the SDKs parse it back.
            let payload = answer.payload.map(Value::to_string);
            let detail = json!({
                "key": answer.key,
                "enabled": answer.on(),
                "variant": answer.variant,
                "reason": {"code": code, "condition_index": 0, "description": description},
                "metadata": {"id": answer.index + 1, "version": 1, "payload": payload, "description": null},
            });
            (answer.key.to_string(), detail)
        })
        .collect();
    json!({"flags": flags, "errorsWhileComputingFlags": false,
           "requestId": uuid::Uuid::now_v7().to_string()})
}

/// `/decide/` and `/flags/` v1: `featureFlags` by key (a variant or a boolean each), and the
/// payloads of those on.
fn older_shape(answers: &[FlagAnswer<'_>]) -> Value {
    let flags: Map<String, Value> = answers
        .iter()
        .map(|answer| (answer.key.to_string(), answer.value()))
        .collect();
    let payloads: Map<String, Value> = answers
        .iter()
        .filter_map(|answer| Some((answer.key.to_string(), answer.payload?.clone())))
        .collect();
    json!({"featureFlags": flags, "featureFlagPayloads": payloads,
           "errorsWhileComputingFlags": false})
}

/// The flag definitions a server SDK evaluates locally. A flag whose answer needs northstar's
/// state of the person (plan, activation, event counts), a partial rollout or variants
/// (bucketed by person, which the SDK cannot know) is marked
/// `ensure_experience_continuity`: the SDK then asks `/flags` for it. A flag that targets only
/// person properties (`traitEquals`), for everyone or no one, is evaluated by the SDK from
/// the properties the app passes, as PostHog's own local evaluation does.
pub fn definitions(state: &AppState) -> HttpResponse {
    let flags: Vec<Value> = state
        .config
        .flags
        .iter()
        .enumerate()
        .map(|(index, flag)| {
            let when = &flag.when;
            let local = flag.variants.is_empty()
                && (flag.rollout == 0.0 || flag.rollout == 1.0)
                && when.group_property_equals.is_empty()
                && when.plan.is_none()
                && when.activated.is_none()
                && when.event_count_at_least.is_empty()
                && when.event_count_below.is_empty();
            let properties: Vec<Value> = when
                .trait_equals
                .iter()
                .map(|(key, value)| {
                    json!({"key": key, "value": value, "operator": "exact", "type": "person"})
                })
                .collect();
            let mut payloads = Map::new();
            if let Some(payload) = &flag.payload {
                payloads.insert("true".into(), Value::String(payload.to_string()));
            }
            for variant in &flag.variants {
                if let Some(payload) = &variant.payload {
                    payloads.insert(variant.key.clone(), Value::String(payload.to_string()));
                }
            }
            let multivariate = (!flag.variants.is_empty()).then(|| {
                let variants: Vec<Value> = flag
                    .variants
                    .iter()
                    .map(|v| json!({"key": v.key, "rollout_percentage": v.share * 100.0}))
                    .collect();
                json!({ "variants": variants })
            });
            json!({
                "id": index + 1,
                "key": flag.key,
                "name": flag.key,
                "active": true,
                "deleted": false,
                "ensure_experience_continuity": !local,
                "filters": {
                    "groups": [{"properties": properties, "rollout_percentage": flag.rollout * 100.0}],
                    "multivariate": multivariate,
                    "payloads": payloads,
                },
            })
        })
        .collect();
    respond::json(
        200,
        &json!({"flags": flags, "group_type_mapping": {}, "cohorts": {}}),
    )
}
