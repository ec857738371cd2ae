//! The route table: which handler answers which method and path.

use bytes::Bytes;
use http::Method;
use http::request::Parts;

use super::respond::{self, HttpError, HttpResponse};
use super::{
    AppState, activation, billing, ingest_routes, insights, limits, ops, posthog_flags, rejected,
    sql,
};
use crate::config::Config;
use crate::error::ErrorKind;
use crate::event::EventType;
use crate::ingest::Wire;

/// The OpenAPI 3.1 document of every route here (a test keeps the two in step).
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

/// Largest body of non-ingest routes (SQL text, admin JSON).
const SMALL_BODY_LIMIT: usize = 1024 * 1024;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An ingest route of a wire.
    Ingest(Wire),
    /// A CORS preflight on an ingest route.
    Preflight,
    /// `POST /v1/sql`.
    Sql,
    /// `POST /v1/check`.
    Check,
    /// `POST /v1/check/batch`: up to 1,000 checks, each answered as `/v1/check` would.
    CheckBatch,
    /// `GET /v1/meters/{feature}/usage`: a feature's usage by window.
    MeterUsage(String),
    /// `GET /v1/persons/{id}`: a person's profile (any of their ids).
    Person(String),
    /// `GET /v1/groups/{type}/{key}`: a group's profile.
    Group(String, String),
    /// `DELETE /v1/persons/{id}`: erases a person (a job to follow).
    ErasePerson(String),
    /// `GET /v1/erasures/{job}`: how far an erasure got.
    Erasure(String),
    /// `GET /v1/erasures`: every erasure.
    Erasures,
    /// `POST /v1/portal/tokens`: a short-lived token for one customer's browser.
    PortalToken,
    /// `GET /v1/portal/usage`: the token's customer's usage.
    PortalUsage,
    /// `GET /v1/portal/events`: the customer's portal events (Server-Sent Events).
    PortalEvents,
    /// `GET /dashboard` and its files.
    Dashboard(super::dashboard::Asset),
    /// `POST /v1/simulate`: pricing what-ifs over a period's usage.
    Simulate,
    /// `GET /v1/portal/entitlements/{feature}`.
    PortalEntitlement(String),
    /// `POST /v1/insights/funnel`.
    Funnel,
    /// `POST /v1/insights/retention`.
    RetentionInsight,
    /// `POST /v1/usage/verify`.
    Verify,
    /// `POST /v1/rejected/replay`.
    RejectedReplay,
    /// `GET /v1/anomalies`.
    Anomalies,
    /// `GET /openapi.json`.
    OpenApi,
    /// `GET /v1/activation`.
    Activation,
    /// `GET /v1/activation/versions/{n}/picture.svg`: a version's picture.
    ActivationPicture(u32),
    /// `POST /v1/activation/recompute`.
    ActivationRecompute,
    /// `POST /v1/activation/experiments`: starts a holdout for the threshold.
    ExperimentStart,
    /// `GET /v1/activation/experiments`.
    Experiments,
    /// `GET /v1/activation/experiments/{id}`: the experiment's report.
    Experiment(String),
    /// `POST /v1/activation/experiments/{id}/stop`.
    ExperimentStop(String),
    /// `GET /v1/northstar`.
    NorthStar,
    /// `GET /v1/users/{id}/onboarding` or `/flags`.
    User(String, &'static str),
    /// `GET /v1/customers/{id}/usage`.
    Usage(String),
    /// `GET /v1/customers/{id}/entitlements/{feature}`.
    Entitlement(String, String),
    /// `GET` or `PUT /v1/customers/{id}`.
    Customer(String),
    /// `GET /v1/billing/status`.
    BillingStatus,
    /// `POST /v1/billing/retry`.
    BillingRetry,
    /// `POST /v1/webhooks/stripe`.
    StripeWebhook,
    /// PostHog's `POST /flags` and `POST /decide`, answered from northstar's flags.
    PostHogFlags,
    /// PostHog's `GET /flags/definitions` and `/api/feature_flag/local_evaluation`: the flag
    /// definitions server SDKs evaluate locally.
    PostHogFlagDefinitions,
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// A known path with the wrong method.
    MethodNotAllowed(&'static str),
    /// Nothing here.
    NotFound,
}

/// Finds the route of a request.
pub fn route(method: &Method, path: &str) -> Route {
    match known_route(method, path) {
        // A browser asks before calling a path it does not know we lack (a PostHog SDK's
        // `/flags`, `/decide`, `/array/…/config`): the preflight passes, so the call that
        // follows gets its 404 with CORS, which the SDK can read, instead of a CORS error.
        Route::NotFound if method == Method::OPTIONS => Route::Preflight,
        route => route,
    }
}

fn known_route(method: &Method, path: &str) -> Route {
    let wire = ingest_wire(path);
    match (method, path) {
        (&Method::OPTIONS, _) if wire.is_some() => Route::Preflight,
        (&Method::POST, _) if wire.is_some() => wire.map(Route::Ingest).unwrap_or(Route::NotFound),
        (_, _) if wire.is_some() => Route::MethodNotAllowed("POST"),
        (&Method::OPTIONS, "/flags" | "/flags/" | "/decide" | "/decide/") => Route::Preflight,
        (&Method::POST, "/flags" | "/flags/" | "/decide" | "/decide/") => Route::PostHogFlags,
        (_, "/flags" | "/flags/" | "/decide" | "/decide/") => Route::MethodNotAllowed("POST"),
        (
            &Method::GET,
            "/flags/definitions"
            | "/flags/definitions/"
            | "/api/feature_flag/local_evaluation"
            | "/api/feature_flag/local_evaluation/",
        ) => Route::PostHogFlagDefinitions,
        (
            _,
            "/flags/definitions"
            | "/flags/definitions/"
            | "/api/feature_flag/local_evaluation"
            | "/api/feature_flag/local_evaluation/",
        ) => Route::MethodNotAllowed("GET"),
        (&Method::POST, "/v1/sql") => Route::Sql,
        (_, "/v1/sql") => Route::MethodNotAllowed("POST"),
        (&Method::POST, "/v1/check") => Route::Check,
        (&Method::POST, "/v1/check/batch") => Route::CheckBatch,
        (method, path) if path.starts_with("/v1/meters/") => {
            let segments: Vec<String> = path
                .trim_start_matches("/v1/meters/")
                .split('/')
                .map(percent_decode)
                .collect();
            match (method, segments.as_slice()) {
                (&Method::GET, [feature, usage]) if usage == "usage" && !feature.is_empty() => {
                    Route::MeterUsage(feature.clone())
                }
                (_, [_, usage]) if usage == "usage" => Route::MethodNotAllowed("GET"),
                _ => Route::NotFound,
            }
        }
        (method, path) if path.starts_with("/v1/persons/") => {
            let id = percent_decode(path.trim_start_matches("/v1/persons/"));
            match *method {
                _ if id.trim().is_empty() || id.contains('/') => Route::NotFound,
                Method::GET => Route::Person(id),
                Method::DELETE => Route::ErasePerson(id),
                _ => Route::MethodNotAllowed("GET, DELETE"),
            }
        }
        (&Method::GET, "/v1/erasures") => Route::Erasures,
        (_, "/v1/erasures") => Route::MethodNotAllowed("GET"),
        (method, path) if path.starts_with("/v1/erasures/") => {
            let job = percent_decode(path.trim_start_matches("/v1/erasures/"));
            match method {
                _ if job.is_empty() || job.contains('/') => Route::NotFound,
                &Method::GET => Route::Erasure(job),
                _ => Route::MethodNotAllowed("GET"),
            }
        }
        (method, path) if path.starts_with("/v1/groups/") => {
            let segments: Vec<String> = path
                .trim_start_matches("/v1/groups/")
                .split('/')
                .map(percent_decode)
                .collect();
            match (method, segments.as_slice()) {
                (&Method::GET, [kind, key]) if !kind.is_empty() && !key.is_empty() => {
                    Route::Group(kind.clone(), key.clone())
                }
                (_, [_, _]) => Route::MethodNotAllowed("GET"),
                _ => Route::NotFound,
            }
        }
        (&Method::POST, "/v1/portal/tokens") => Route::PortalToken,
        (_, "/v1/portal/tokens") => Route::MethodNotAllowed("POST"),
        (&Method::OPTIONS, path) if path.starts_with("/v1/portal/") => Route::Preflight,
        (&Method::GET, "/v1/portal/usage") => Route::PortalUsage,
        (&Method::GET, "/v1/portal/events") => Route::PortalEvents,
        (_, "/v1/portal/events") => Route::MethodNotAllowed("GET"),
        (_, "/v1/portal/usage") => Route::MethodNotAllowed("GET"),
        (method, path) if path.starts_with("/v1/portal/entitlements/") => {
            let feature = percent_decode(path.trim_start_matches("/v1/portal/entitlements/"));
            match method {
                _ if feature.is_empty() || feature.contains('/') => Route::NotFound,
                &Method::GET => Route::PortalEntitlement(feature),
                _ => Route::MethodNotAllowed("GET"),
            }
        }
        (&Method::POST, "/v1/insights/funnel") => Route::Funnel,
        (&Method::POST, "/v1/insights/retention") => Route::RetentionInsight,
        (_, "/v1/insights/funnel" | "/v1/insights/retention") => Route::MethodNotAllowed("POST"),
        (_, "/v1/check/batch") => Route::MethodNotAllowed("POST"),
        (&Method::POST, "/v1/usage/verify") => Route::Verify,
        (&Method::POST, "/v1/simulate") => Route::Simulate,
        (_, "/v1/simulate") => Route::MethodNotAllowed("POST"),
        (&Method::POST, "/v1/rejected/replay") => Route::RejectedReplay,
        (&Method::GET, "/v1/anomalies") => Route::Anomalies,
        (&Method::GET, "/openapi.json") => Route::OpenApi,
        (method, path) if super::dashboard::Asset::at(path).is_some() => {
            match (method, super::dashboard::Asset::at(path)) {
                (&Method::GET, Some(asset)) => Route::Dashboard(asset),
                _ => Route::MethodNotAllowed("GET"),
            }
        }
        (&Method::GET, "/v1/activation") => Route::Activation,
        (method, path) if path.starts_with("/v1/activation/versions/") => {
            match path
                .trim_start_matches("/v1/activation/versions/")
                .strip_suffix("/picture.svg")
                .and_then(|n| n.parse::<u32>().ok())
            {
                Some(version) if method == Method::GET => Route::ActivationPicture(version),
                Some(_) => Route::MethodNotAllowed("GET"),
                None => Route::NotFound,
            }
        }
        (&Method::POST, "/v1/activation/recompute") => Route::ActivationRecompute,
        (&Method::POST, "/v1/activation/experiments") => Route::ExperimentStart,
        (&Method::GET, "/v1/activation/experiments") => Route::Experiments,
        (_, "/v1/activation/experiments") => Route::MethodNotAllowed("GET, POST"),
        (method, path) if path.starts_with("/v1/activation/experiments/") => {
            let rest = path.trim_start_matches("/v1/activation/experiments/");
            match (method, rest.split_once('/')) {
                (&Method::GET, None) if !rest.is_empty() => Route::Experiment(percent_decode(rest)),
                (&Method::POST, Some((id, "stop"))) if !id.is_empty() => {
                    Route::ExperimentStop(percent_decode(id))
                }
                (_, None) if !rest.is_empty() => Route::MethodNotAllowed("GET"),
                (_, Some((_, "stop"))) => Route::MethodNotAllowed("POST"),
                _ => Route::NotFound,
            }
        }
        (&Method::GET, "/v1/northstar") => Route::NorthStar,
        (&Method::GET, "/v1/billing/status") => Route::BillingStatus,
        (&Method::POST, "/v1/billing/retry") => Route::BillingRetry,
        (&Method::POST, "/v1/webhooks/stripe") => Route::StripeWebhook,
        (_, "/v1/billing/status") => Route::MethodNotAllowed("GET"),
        (_, "/v1/billing/retry" | "/v1/webhooks/stripe") => Route::MethodNotAllowed("POST"),
        (_, "/v1/activation" | "/v1/northstar") => Route::MethodNotAllowed("GET"),
        (_, "/v1/activation/recompute") => Route::MethodNotAllowed("POST"),
        (_, "/v1/anomalies") => Route::MethodNotAllowed("GET"),
        (_, "/v1/rejected/replay") => Route::MethodNotAllowed("POST"),
        (_, "/v1/usage/verify") => Route::MethodNotAllowed("POST"),
        (_, "/v1/check") => Route::MethodNotAllowed("POST"),
        (method, path) if path.starts_with("/v1/customers/") => customer_route(method, path),
        (method, path) if path.starts_with("/v1/users/") => {
            let segments: Vec<String> = path
                .trim_start_matches("/v1/users/")
                .split('/')
                .map(percent_decode)
                .collect();
            match (method, segments.as_slice()) {
                (&Method::GET, [id, what]) if !id.is_empty() && what == "onboarding" => {
                    Route::User(id.clone(), "onboarding")
                }
                (&Method::GET, [id, what]) if !id.is_empty() && what == "flags" => {
                    Route::User(id.clone(), "flags")
                }
                (_, [_, what]) if what == "onboarding" || what == "flags" => {
                    Route::MethodNotAllowed("GET")
                }
                _ => Route::NotFound,
            }
        }
        (&Method::GET | &Method::HEAD, "/healthz") => Route::Health,
        (&Method::GET, "/metrics") => Route::Metrics,
        (_, "/healthz" | "/metrics") => Route::MethodNotAllowed("GET"),
        _ => Route::NotFound,
    }
}

/// The customer routes: `/v1/customers/{id}[/usage | /entitlements/{feature}]`.
fn customer_route(method: &Method, path: &str) -> Route {
    let rest = path.trim_start_matches("/v1/customers/");
    let mut segments: Vec<String> = rest.split('/').map(percent_decode).collect();
    // Ingest and `/v1/check` trim ids (Unicode whitespace, NBSP and U+3000 included): so do
    // these routes, or `"pad "` would be metered under `pad` and looked up under `pad `.
    if let Some(id) = segments.first_mut() {
        *id = id.trim().to_string();
    }
    match (method, segments.as_slice()) {
        (&Method::GET | &Method::PUT, [id]) if !id.is_empty() => Route::Customer(id.clone()),
        (_, [id]) if !id.is_empty() => Route::MethodNotAllowed("GET, PUT"),
        (&Method::GET, [id, usage]) if usage == "usage" && !id.is_empty() => {
            Route::Usage(id.clone())
        }
        (&Method::GET, [id, e, feature]) if e == "entitlements" && !id.is_empty() => {
            Route::Entitlement(id.clone(), feature.clone())
        }
        (_, [_, usage]) if usage == "usage" => Route::MethodNotAllowed("GET"),
        (_, [_, e, _]) if e == "entitlements" => Route::MethodNotAllowed("GET"),
        _ => Route::NotFound,
    }
}

/// Decodes `%XX` escapes of a path segment (invalid escapes are kept as they are).
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// The wire of an ingest path, Segment's or PostHog's.
fn ingest_wire(path: &str) -> Option<Wire> {
    let path = path.trim_end_matches('/');
    INGEST_PATHS
        .iter()
        .find(|(served, _)| served.trim_end_matches('/') == path)
        .map(|&(_, wire)| wire)
}

/// Every ingest path, with or without its trailing slash, and the wire it speaks: Segment's
/// (and its browser SDK's one-letter paths), PostHog's. The OpenAPI document lists each (a
/// test holds the two together).
pub(crate) const INGEST_PATHS: &[(&str, Wire)] = &[
    ("/v1/batch", Wire::Segment(None)),
    ("/v1/b", Wire::Segment(None)),
    ("/v1/track", Wire::Segment(Some(EventType::Track))),
    ("/v1/t", Wire::Segment(Some(EventType::Track))),
    ("/v1/identify", Wire::Segment(Some(EventType::Identify))),
    ("/v1/i", Wire::Segment(Some(EventType::Identify))),
    ("/v1/page", Wire::Segment(Some(EventType::Page))),
    ("/v1/p", Wire::Segment(Some(EventType::Page))),
    ("/v1/screen", Wire::Segment(Some(EventType::Screen))),
    ("/v1/s", Wire::Segment(Some(EventType::Screen))),
    ("/v1/group", Wire::Segment(Some(EventType::Group))),
    ("/v1/g", Wire::Segment(Some(EventType::Group))),
    ("/v1/alias", Wire::Segment(Some(EventType::Alias))),
    ("/v1/a", Wire::Segment(Some(EventType::Alias))),
    ("/batch/", Wire::PostHog),
    ("/capture/", Wire::PostHog),
    ("/e/", Wire::PostHog),
    ("/i/v0/e/", Wire::PostHog),
    ("/track", Wire::PostHog),
];

/// Who may call a route: declared here for every route and checked once, in [`dispatch`],
/// before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, metrics, the OpenAPI document, CORS preflights, and the answers of
    /// no route.
    Open,
    /// A write key, which the ingest handler reads wherever the wire carries it (a header
    /// or the body).
    WriteKey,
    /// A service key or the admin key, as `Authorization: Bearer`.
    Service,
    /// The admin key, as `Authorization: Bearer`.
    Admin,
    /// An analyst key or the admin key, as `Authorization: Bearer`: reads of the event
    /// history (SQL, insights, people), nothing that writes or acts.
    Read,
    /// A service key, an analyst key or the admin key: reads a service and an analyst both
    /// make (the activation result, the North Star series).
    ServiceOrRead,
    /// A portal token (`Authorization: Bearer pt_…` or `?token=`), scoped to one customer.
    Portal,
    /// A `Stripe-Signature` over the body, which the webhook handler verifies.
    Signed,
}

impl Route {
    /// Who may call the route.
    pub fn access(&self) -> Access {
        match self {
            Self::Ingest(_) | Self::PostHogFlags => Access::WriteKey,
            Self::Check
            | Self::CheckBatch
            | Self::Entitlement(..)
            | Self::User(..)
            | Self::MeterUsage(_)
            | Self::PortalToken
            | Self::PostHogFlagDefinitions => Access::Service,
            Self::Activation
            | Self::ActivationPicture(_)
            | Self::NorthStar
            | Self::Usage(_)
            | Self::Experiments
            | Self::Experiment(_) => Access::ServiceOrRead,
            Self::PortalUsage | Self::PortalEntitlement(_) | Self::PortalEvents => Access::Portal,
            Self::Sql
            | Self::BillingStatus
            | Self::Person(_)
            | Self::Group(..)
            | Self::Funnel
            | Self::RetentionInsight => Access::Read,
            Self::Verify
            | Self::ErasePerson(_)
            | Self::Erasure(_)
            | Self::Erasures
            | Self::Simulate
            | Self::RejectedReplay
            | Self::Anomalies
            | Self::ActivationRecompute
            | Self::ExperimentStart
            | Self::ExperimentStop(_)
            | Self::Customer(_)
            | Self::BillingRetry => Access::Admin,
            Self::StripeWebhook => Access::Signed,
            Self::Preflight
            | Self::OpenApi
            | Self::Dashboard(_)
            | Self::Health
            | Self::Metrics
            | Self::MethodNotAllowed(_)
            | Self::NotFound => Access::Open,
        }
    }

    /// The most body bytes the route reads (ingest bodies may be gzip, so this bounds the
    /// compressed size; the decoded size is bounded again after decompression).
    pub fn body_limit(&self, config: &Config) -> usize {
        match self {
            // PostHog may send the batch base64-encoded: a third larger before decoding.
            Self::Ingest(Wire::PostHog) => config.ingest.max_batch_bytes / 3 * 4 + 4_096,
            Self::Ingest(_) => config.ingest.max_batch_bytes,
            _ => SMALL_BODY_LIMIT,
        }
    }

    /// Whether the route takes a place among the concurrent requests. Health and metrics do
    /// not: a server full of requests must still say how it is.
    pub fn takes_a_request_place(&self) -> bool {
        !matches!(self, Self::Health | Self::Metrics)
    }

    /// Whether the route's work runs to its end even when its answer went out on the time
    /// limit. A consume reserves usage, and only the outcome of its publish (bounded by the
    /// stream's ack timeout) keeps or releases the reservation: cut short, it would hold it.
    pub fn finishes_after_its_answer(&self) -> bool {
        matches!(self, Self::Check | Self::CheckBatch)
    }

    /// A short name for metrics and logs.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Ingest(Wire::Segment(_)) => "segment",
            Self::Ingest(Wire::PostHog) | Self::PostHogFlags | Self::PostHogFlagDefinitions => {
                "posthog"
            }
            Self::Preflight => "preflight",
            Self::Sql | Self::Funnel | Self::RetentionInsight => "sql",
            Self::Person(_)
            | Self::Group(..)
            | Self::ErasePerson(_)
            | Self::Erasure(_)
            | Self::Erasures => "admin",
            Self::Check | Self::CheckBatch => "check",
            Self::Verify
            | Self::Simulate
            | Self::RejectedReplay
            | Self::Anomalies
            | Self::ActivationRecompute
            | Self::BillingStatus
            | Self::BillingRetry => "admin",
            Self::StripeWebhook => "webhooks",
            Self::Activation
            | Self::ActivationPicture(_)
            | Self::NorthStar
            | Self::User(..)
            | Self::Experiments
            | Self::Experiment(_) => "usage",
            Self::ExperimentStart | Self::ExperimentStop(_) => "admin",
            Self::Usage(_) | Self::Entitlement(..) | Self::MeterUsage(_) => "usage",
            Self::PortalToken
            | Self::PortalUsage
            | Self::PortalEntitlement(_)
            | Self::PortalEvents => "usage",
            Self::Customer(_) => "customers",
            Self::Health | Self::OpenApi => "healthz",
            Self::Dashboard(_) => "dashboard",
            Self::Metrics => "metrics",
            Self::MethodNotAllowed(_) | Self::NotFound => "other",
        }
    }

    /// Adds what every answer of this route carries: CORS on the ingest routes (errors
    /// included) and on the answers a browser SDK can meet elsewhere (a preflight, a 404, a
    /// 405), so it reads them instead of a CORS error. The keyed API routes carry none.
    pub fn finish(&self, mut response: HttpResponse) -> HttpResponse {
        if matches!(
            self,
            Self::Ingest(_)
                | Self::PostHogFlags
                | Self::PortalUsage
                | Self::PortalEntitlement(_)
                | Self::PortalEvents
                | Self::Preflight
                | Self::NotFound
                | Self::MethodNotAllowed(_)
        ) {
            respond::allow_cors(&mut response);
        }
        response
    }
}

/// Runs the handler of `route`, once the caller has the route's [`Access`].
pub(crate) async fn dispatch(
    state: &AppState,
    route: &Route,
    parts: &Parts,
    body: Bytes,
) -> HttpResponse {
    let bearer = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let mut grant = None;
    let allowed = match route.access() {
        Access::Service => state.require_service(bearer),
        Access::Admin => state.require_admin(bearer),
        Access::Read => state.require_reader(bearer),
        Access::ServiceOrRead => state
            .require_service(bearer)
            .or_else(|_| state.require_reader(bearer)),
        Access::Portal => state.portal_grant(parts).map(|g| grant = Some(g)),
        Access::Open | Access::WriteKey | Access::Signed => Ok(()),
    };
    if let Err(error) = allowed {
        return respond::error(&error);
    }
    match route {
        Route::Ingest(wire) => ingest_routes::handle(state, *wire, parts, &body).await,
        Route::Preflight => respond::preflight(),
        Route::Sql => sql::handle(state, parts, &body).await,
        Route::Check => limits::check(state, &body).await,
        Route::CheckBatch => limits::check_batch(state, &body).await,
        Route::Funnel => insights::funnel(state, &body).await,
        Route::MeterUsage(feature) => limits::meter_usage(state, feature, parts).await,
        Route::PortalToken => limits::portal_token(state, &body),
        Route::Person(id) => insights::person(state, id).await,
        Route::Group(kind, key) => insights::group(state, kind, key).await,
        Route::ErasePerson(id) => super::erasures::erase_person(state, id).await,
        Route::Erasure(job) => super::erasures::erasure(state, job),
        Route::Erasures => super::erasures::erasures(state),
        Route::PortalUsage | Route::PortalEntitlement(_) | Route::PortalEvents => {
            let Some(grant) = grant else {
                return respond::error(&HttpError::new(
                    ErrorKind::Unauthorized,
                    "missing_portal_token",
                    "a portal token is needed",
                ));
            };
            match route {
                Route::PortalEntitlement(feature) => {
                    limits::entitlement(state, &grant.customer_id, feature).await
                }
                Route::PortalEvents => super::portal_events::events(state, parts, &grant).await,
                _ => limits::usage(state, &grant.customer_id).await,
            }
        }
        Route::RetentionInsight => insights::retention(state, &body).await,
        Route::Verify => limits::verify(state).await,
        Route::Simulate => limits::simulate(state, &body).await,
        Route::RejectedReplay => rejected::replay(state, &body).await,
        Route::Anomalies => limits::anomalies(state).await,
        Route::Activation => activation::get(state).await,
        Route::ActivationPicture(version) => activation::picture(state, *version).await,
        Route::ActivationRecompute => activation::recompute(state).await,
        Route::ExperimentStart => activation::start_experiment(state, &body),
        Route::Experiments => activation::experiments(state),
        Route::Experiment(id) => activation::experiment(state, id).await,
        Route::ExperimentStop(id) => activation::stop_experiment(state, id),
        Route::NorthStar => activation::northstar(state).await,
        Route::User(user, what) => activation::user(state, user, what).await,
        Route::Dashboard(asset) => super::dashboard::serve(*asset),
        Route::OpenApi => {
            respond::bytes_response(200, "application/json", OPENAPI.as_bytes().to_vec())
        }
        Route::Usage(customer) => limits::usage(state, customer).await,
        Route::Entitlement(customer, feature) => {
            limits::entitlement(state, customer, feature).await
        }
        Route::Customer(customer) if parts.method == Method::PUT => {
            limits::put_customer(state, customer, &body).await
        }
        Route::Customer(customer) => limits::get_customer(state, customer).await,
        Route::BillingStatus => billing::status(state),
        Route::BillingRetry => billing::retry(state),
        Route::StripeWebhook => billing::stripe_webhook(state, parts, &body).await,
        Route::PostHogFlags => posthog_flags::evaluate(state, parts, &body).await,
        Route::PostHogFlagDefinitions => posthog_flags::definitions(state),
        Route::Health => ops::healthz(state).await,
        Route::Metrics => ops::metrics(state, parts).await,
        Route::MethodNotAllowed(allowed) => {
            let mut response = respond::error(&HttpError::new(
                ErrorKind::MethodNotAllowed,
                "method_not_allowed",
                format!("use {allowed} on {}", parts.uri.path()),
            ));
            if let Ok(value) = http::HeaderValue::from_str(allowed) {
                response.headers_mut().insert(http::header::ALLOW, value);
            }
            response
        }
        Route::NotFound => respond::error(&HttpError::new(
            ErrorKind::NotFound,
            "not_found",
            format!("no route {} {}", parts.method, parts.uri.path()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A documented path with its parameters filled in, as a client would call it.
    fn concrete(path: &str) -> String {
        path.replace("/v1/users/{id}", "/v1/users/u1")
            .replace("{id}", "acme")
            .replace("{feature}", "api_requests")
            .replace("{version}", "1")
            .replace("{type}/{key}", "company/acme")
            .replace("{job}", "erase-1")
            .replace("{experiment}", "exp-1")
    }

    /// The access each route declares is what the OpenAPI document says of its operation: a
    /// bearer key where the route checks one, none where it is open or signed.
    #[test]
    fn each_routes_access_is_the_documented_security() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi");
        let mut checked = 0;
        for (path, operations) in document["paths"].as_object().expect("paths") {
            let concrete = concrete(path);
            for (method, operation) in operations.as_object().expect("operations") {
                let Ok(method) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                let access = route(&method, &concrete).access();
                let bearer = operation["security"]
                    .as_array()
                    .is_some_and(|schemes| schemes.iter().any(|s| s.get("bearer").is_some()));
                match access {
                    Access::WriteKey => continue,
                    Access::Service | Access::Admin | Access::Read | Access::ServiceOrRead => {
                        assert!(bearer, "{method} {path} takes a key the document omits")
                    }
                    Access::Portal => {
                        let portal = operation["security"].as_array().is_some_and(|schemes| {
                            schemes.iter().any(|s| s.get("portalToken").is_some())
                        });
                        assert!(
                            portal,
                            "{method} {path} takes a portal token the document omits"
                        )
                    }
                    Access::Open | Access::Signed => {
                        assert!(
                            !bearer,
                            "{method} {path} is documented with a key it does not check"
                        )
                    }
                }
                checked += 1;
            }
        }
        assert!(checked >= 20, "{checked} operations checked");
        assert_eq!(route(&Method::POST, "/v1/sql").access(), Access::Read);
        assert_eq!(route(&Method::POST, "/v1/check").access(), Access::Service);
        assert_eq!(
            route(&Method::PUT, "/v1/customers/a").access(),
            Access::Admin
        );
        assert_eq!(
            route(&Method::POST, "/v1/webhooks/stripe").access(),
            Access::Signed
        );
    }

    /// The document says what a request must carry (a required body where the route reads
    /// one, with its 400; 401 where it checks a key), and lists every ingest path served,
    /// the SDKs' aliases included.
    #[test]
    fn the_document_says_what_each_request_carries_and_lists_every_ingest_path() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi");
        let paths = document["paths"].as_object().expect("paths");
        for (path, operations) in paths {
            let concrete = concrete(path);
            for (method, operation) in operations.as_object().expect("operations") {
                let Ok(method) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                if !matches!(method, Method::GET | Method::PUT | Method::POST) {
                    continue;
                }
                let routed = route(&method, &concrete.replace("/v1/users/acme", "/v1/users/u1"));
                if let Some(body) = operation.get("requestBody") {
                    assert_eq!(body["required"], true, "{method} {path}: body not required");
                    assert!(
                        operation["responses"].get("400").is_some(),
                        "{method} {path}: no 400"
                    );
                }
                if !matches!(routed.access(), Access::Open | Access::Signed) {
                    assert!(
                        operation["responses"].get("401").is_some(),
                        "{method} {path} checks a key but documents no 401"
                    );
                }
                if routed.access() == Access::WriteKey {
                    assert!(
                        operation.get("requestBody").is_some(),
                        "{method} {path}: ingest without a documented body"
                    );
                }
            }
        }
        for &(path, wire) in INGEST_PATHS {
            assert!(
                paths.get(path).and_then(|p| p.get("post")).is_some(),
                "POST {path} is served but not documented"
            );
            assert_eq!(route(&Method::POST, path), Route::Ingest(wire), "{path}");
            let other = match path.strip_suffix('/') {
                Some(bare) => bare.to_string(),
                None => format!("{path}/"),
            };
            assert_eq!(route(&Method::POST, &other), Route::Ingest(wire), "{other}");
        }
        assert_eq!(route(&Method::OPTIONS, "/v1/t"), Route::Preflight);
        assert_eq!(
            route(&Method::GET, "/v1/batch"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(route(&Method::POST, "/v1/nope"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/v1/sql"), Route::Sql);
        assert_eq!(route(&Method::POST, "/v1/check"), Route::Check);
        assert_eq!(
            route(&Method::GET, "/v1/customers/ac%20me/usage"),
            Route::Usage("ac me".into())
        );
        assert_eq!(
            route(&Method::GET, "/v1/customers/acme/entitlements/api_requests"),
            Route::Entitlement("acme".into(), "api_requests".into())
        );
        assert_eq!(
            route(&Method::PUT, "/v1/customers/acme"),
            Route::Customer("acme".into())
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/customers/acme"),
            Route::MethodNotAllowed("GET, PUT")
        );
        assert_eq!(route(&Method::GET, "/v1/customers/"), Route::NotFound);
    }

    #[test]
    fn every_documented_operation_is_routed_and_every_route_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = concrete(path);
            for method in ["get", "put", "post"] {
                if item.get(method).is_some() {
                    let m: Method = method.to_uppercase().parse().unwrap();
                    let routed = route(&m, &concrete);
                    assert!(
                        !matches!(routed, Route::NotFound | Route::MethodNotAllowed(_)),
                        "{method} {path} is documented but not routed"
                    );
                    documented.push(routed);
                }
            }
        }
        // Every kind of route has a documented operation.
        let kinds = [
            route(&Method::POST, "/v1/batch"),
            route(&Method::POST, "/v1/track"),
            route(&Method::POST, "/batch/"),
            route(&Method::POST, "/flags/"),
            route(&Method::GET, "/flags/definitions"),
            route(&Method::POST, "/v1/sql"),
            route(&Method::POST, "/v1/check"),
            route(&Method::POST, "/v1/check/batch"),
            route(&Method::POST, "/v1/insights/funnel"),
            route(&Method::POST, "/v1/insights/retention"),
            route(&Method::POST, "/v1/usage/verify"),
            route(&Method::POST, "/v1/rejected/replay"),
            route(&Method::GET, "/v1/anomalies"),
            route(&Method::GET, "/v1/customers/acme"),
            route(&Method::GET, "/v1/customers/acme/usage"),
            route(&Method::GET, "/v1/meters/api_requests/usage"),
            route(&Method::POST, "/v1/portal/tokens"),
            route(&Method::GET, "/v1/persons/acme"),
            route(&Method::GET, "/v1/groups/company/acme"),
            route(&Method::GET, "/v1/portal/usage"),
            route(&Method::GET, "/v1/portal/entitlements/api_requests"),
            route(&Method::GET, "/v1/customers/acme/entitlements/api_requests"),
            route(&Method::GET, "/healthz"),
            route(&Method::GET, "/metrics"),
            route(&Method::GET, "/openapi.json"),
            route(&Method::GET, "/v1/activation"),
            route(&Method::POST, "/v1/activation/recompute"),
            route(&Method::GET, "/v1/activation/versions/1/picture.svg"),
            route(&Method::GET, "/v1/northstar"),
            route(&Method::GET, "/v1/users/u1/onboarding"),
            route(&Method::GET, "/v1/users/u1/flags"),
            route(&Method::GET, "/v1/billing/status"),
            route(&Method::POST, "/v1/billing/retry"),
            route(&Method::POST, "/v1/webhooks/stripe"),
        ];
        for kind in kinds {
            assert!(
                documented.contains(&kind),
                "{kind:?} is routed but not documented"
            );
        }
    }
}
