//! The billing sink and the upgrade path.
//!
//! - [`windows`]: billed usage summed per customer, feature and window of event time;
//! - [`outbox`]: what is owed, on disk before any call, with deterministic identifiers;
//! - [`runner`]: the stream follower that fills windows and owes what closes;
//! - [`deliver`]: one call at a time per customer and meter, rate cap, backoff, dead letters;
//! - [`sink`]: Stripe meter events or a generic JSON webhook;
//! - [`stripe`]: Stripe's API (meter events, summaries, Checkout, webhook signatures);
//! - [`reconcile`]: what we reported against what the provider has;
//! - [`upgrade`]: Checkout Sessions for a 402 and Stripe webhooks that change plans.
//!
//! Exactly once, end to end: a window's report is owed (fsynced) before it is sent; it is sent
//! until the provider confirms it or refuses it for good; and every repeat carries the same
//! identifier, which the provider keeps once. What is owed is derived from closed usage, which
//! is a function of the stream, so a crash and replay re-derive it and owe nothing twice.

pub mod deliver;
pub mod outbox;
pub mod reconcile;
pub mod runner;
pub mod sink;
pub mod stripe;
pub mod upgrade;
pub mod windows;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::bus::BusError;
use crate::bus::follower::Part;
use crate::clock::{Clock, format_micros};
use crate::config::{BillingProvider, BillingSettings, Config};
use crate::error::{Classify, ErrorKind};
use crate::meter::customers::CustomerStore;
use crate::meter::spec::MeterSpec;
use crate::shutdown::Shutdown;
use deliver::{DeliveryStats, Pace};
use outbox::{Outbox, OutboxError, Standing};
use runner::{BilledMeter, BillingFollower, WindowsView};
use sink::Sink;
use stripe::{SignatureError, Stripe};

/// Secrets from the environment (`STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET`).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// Stripe's secret API key (`sk_…`).
    pub secret_key: Option<String>,
    /// The webhook endpoint's signing secret (`whsec_…`).
    pub webhook_secret: Option<String>,
}

impl Secrets {
    /// Reads both from the environment; empty values count as unset.
    pub fn from_env() -> Self {
        let read = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            secret_key: read("STRIPE_SECRET_KEY"),
            webhook_secret: read("STRIPE_WEBHOOK_SECRET"),
        }
    }
}

/// Why billing could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The provider is Stripe and no key is set.
    #[error("billing.provider is stripe but STRIPE_SECRET_KEY is not set")]
    MissingKey,
    /// The outbox is unreadable or unwritable.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The stream could not be read.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A webhook's signature is wrong, missing or stale.
    #[error("invalid Stripe-Signature: {0}")]
    Signature(#[from] SignatureError),
    /// Webhooks are not set up.
    #[error("Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET")]
    WebhooksOff,
    /// A webhook's body is not a Stripe event, or names something unknown.
    #[error("{0}")]
    BadEvent(String),
    /// The plan change could not be stored.
    #[error("storing the plan change: {0}")]
    Store(String),
}

impl Classify for BillingError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Signature(_) | Self::BadEvent(_) => ErrorKind::InvalidInput,
            Self::WebhooksOff | Self::Bus(_) | Self::Store(_) => ErrorKind::Unavailable,
            Self::MissingKey | Self::Outbox(_) => ErrorKind::Internal,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Signature(_) => "invalid_signature",
            Self::BadEvent(_) => "invalid_event",
            Self::WebhooksOff => "webhooks_not_configured",
            Self::Store(_) => "store_unavailable",
            Self::Bus(_) => "stream_unavailable",
            Self::MissingKey | Self::Outbox(_) => "billing_unavailable",
        }
    }
}

/// The running billing sink and upgrade path.
pub struct Billing {
    settings: BillingSettings,
    outbox: Arc<Mutex<Outbox>>,
    view: Arc<Mutex<WindowsView>>,
    stats: Arc<Mutex<DeliveryStats>>,
    requeue: mpsc::UnboundedSender<Vec<outbox::Entry>>,
    stripe: Option<Stripe>,
    webhook_secret: Option<String>,
    customers: Arc<CustomerStore>,
    spec: MeterSpec,
    known_plans: Vec<String>,
    default_plan: String,
    checkouts: upgrade::Checkouts,
    /// How long a 402 waits for its Checkout Session: the Stripe timeout, but never more than
    /// half the request time limit, so the 402 is answered in time with or without one.
    checkout_wait: Duration,
    seen_events: Mutex<(VecDeque<String>, HashSet<String>)>,
    clock: Clock,
}

/// Where billing reads from.
pub struct BillingTarget<'a> {
    /// The events stream.
    pub stream: &'a str,
    /// The data dir (`data/billing` is made under it).
    pub data_dir: &'a Path,
}

/// Billing once started: the service, its part of the stream followers, and the delivery task.
pub struct Started {
    /// What the API and the upgrade flow use.
    pub billing: Arc<Billing>,
    /// The windows' follower (run in the shared [`crate::bus::follower::Fanout`]).
    pub follower: Part,
    /// Delivery of the outbox to the provider, until shutdown: for the caller to run under
    /// its supervisor, so a panic in it is seen.
    pub delivery: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Billing {
    /// Outbox entries and Checkout Sessions held (for metrics).
    pub fn sizes(&self) -> (usize, usize) {
        let outbox = self.outbox.lock().map(|o| o.len()).unwrap_or(0);
        let checkouts = self.checkouts.lock().map(|c| c.len()).unwrap_or(0);
        (outbox, checkouts)
    }

    /// What delivery has done, for `/metrics`: the outbox's entries by standing and the
    /// delivery task's counts since start.
    pub fn delivery(&self) -> Delivery {
        let mut delivery = Delivery::default();
        if let Ok(outbox) = self.outbox.lock() {
            for (_, standing) in outbox.all() {
                match standing {
                    Standing::Pending => delivery.pending += 1,
                    Standing::Delivered => delivery.delivered += 1,
                    Standing::Dead { .. } => delivery.dead += 1,
                }
            }
        }
        if let Ok(stats) = self.stats.lock() {
            delivery.attempts = stats.attempts;
            delivery.retries = stats.retries;
            delivery.confirmed = stats.delivered;
        }
        delivery
    }
}

/// The outbox's entries by standing, and the calls delivery made since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Reports owed and not yet confirmed by the provider.
    pub pending: u64,
    /// Reports the provider confirmed (kept until the outbox's retention lets them go).
    pub delivered: u64,
    /// Reports the provider refused for good (`northstar billing status` lists them).
    pub dead: u64,
    /// Calls made to the provider since start.
    pub attempts: u64,
    /// Calls that failed for a reason that passes and will be made again.
    pub retries: u64,
    /// Reports confirmed since start.
    pub confirmed: u64,
}

/// Prepares delivery and the windows' follower; `None` when the config has no `billing`
/// section.
pub async fn start(
    config: &Config,
    secrets: Secrets,
    js: &async_nats::jetstream::Context,
    target: BillingTarget<'_>,
    customers: Arc<CustomerStore>,
    clock: Clock,
    shutdown: Shutdown,
) -> Result<Option<Started>, BillingError> {
    let Some(settings) = config.billing.clone() else {
        return Ok(None);
    };
    let timeout = settings.timeout.get();
    let stripe = match (&secrets.secret_key, settings.provider) {
        (Some(key), _) => Some(Stripe::new(&settings.api_base, key, timeout)),
        (None, BillingProvider::Stripe) => return Err(BillingError::MissingKey),
        (None, BillingProvider::Webhook) => None,
    };
    let sink = match (settings.provider, &stripe) {
        (BillingProvider::Stripe, Some(stripe)) => Sink::Stripe(stripe.clone()),
        _ => Sink::Webhook {
            http: crate::client::HttpClient::new(),
            url: settings.url.clone().unwrap_or_default(),
            timeout,
        },
    };
    let dir = target.data_dir.join("billing");
    let outbox = Arc::new(Mutex::new(Outbox::open(&dir)?));
    let spec = MeterSpec::from_config(config);
    let mut meters: HashMap<String, Vec<BilledMeter>> = HashMap::new();
    for event in &config.events {
        let Some(metering) = &event.metering else {
            continue;
        };
        let Some(event_name) = settings.meters.get(&metering.feature_id) else {
            continue;
        };
        meters
            .entry(event.name.clone())
            .or_default()
            .push(BilledMeter {
                feature: metering.feature_id.clone(),
                event_name: event_name.clone(),
                value_property: metering.value_property.clone(),
                aggregation: metering.aggregation,
            });
    }
    let created = crate::bus::streams::stream_incarnation(js, target.stream).await?;
    let window = micros(settings.window.get());
    let grace = micros(settings.grace.get());
    let (windows, after_seq) = runner::load(&dir, &created, window, grace);
    tracing::info!(
        resume_after = after_seq,
        open_windows = windows.open_count(),
        "billing resuming"
    );
    let (deliver_tx, deliver_rx) = mpsc::unbounded_channel();
    let view = Arc::new(Mutex::new(WindowsView::default()));
    let follower = BillingFollower {
        windows,
        meters,
        outbox: outbox.clone(),
        customers: customers.clone(),
        deliver: deliver_tx.clone(),
        dir,
        stream_created: created,
        seq: after_seq,
        clock: clock.clone(),
        view: view.clone(),
        written_seq: None,
        saved: Arc::new(std::sync::atomic::AtomicU64::new(after_seq)),
    };
    let follower = Part::new(follower, after_seq, settings.flush_interval.get());
    let stats = Arc::new(Mutex::new(DeliveryStats::default()));
    let pace = Pace {
        concurrency: settings.concurrency,
        rate_limit: settings.rate_limit,
        retry_base: settings.retry_base.get(),
        retry_max: settings.retry_max.get(),
    };
    let delivery = Box::pin(deliver::run(
        outbox.clone(),
        sink,
        pace,
        deliver_rx,
        stats.clone(),
        shutdown,
    ));
    let billing = Billing {
        outbox,
        view,
        stats,
        requeue: deliver_tx,
        stripe,
        webhook_secret: secrets.webhook_secret,
        customers,
        spec,
        known_plans: config
            .known_plans()
            .into_iter()
            .map(str::to_string)
            .collect(),
        default_plan: config.metering.default_plan.clone(),
        checkouts: Arc::default(),
        checkout_wait: timeout.min(config.ingest.request_timeout.get() / 2),
        seen_events: Mutex::new((VecDeque::new(), HashSet::new())),
        clock,
        settings,
    };
    Ok(Some(Started {
        billing: Arc::new(billing),
        follower,
        delivery,
    }))
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// `GET /v1/billing/status` and `northstar billing status`: the outbox's totals and letters.
pub fn status_of(outbox: &Outbox, provider: BillingProvider) -> Value {
    let mut pending = 0;
    let mut delivered = 0;
    let mut dead = Vec::new();
    for (entry, standing) in outbox.all() {
        match standing {
            Standing::Pending => pending += 1,
            Standing::Delivered => delivered += 1,
            Standing::Dead { status, message } => dead.push(json!({
                "identifier": entry.identifier,
                "customer_id": entry.customer_id,
                "feature": entry.feature,
                "event_name": entry.event_name,
                "value": entry.value,
                "window_start": format_micros(entry.window_start),
                "revision": entry.revision,
                "status": status,
                "message": message,
            })),
        }
    }
    let totals: Vec<Value> = outbox
        .totals()
        .into_iter()
        .map(|((customer, feature), (owed, delivered))| {
            json!({"customer_id": customer, "feature": feature, "owed": owed, "delivered": delivered})
        })
        .collect();
    json!({
        "provider": provider,
        "pending": pending,
        "delivered": delivered,
        "dead": dead,
        "totals": totals,
    })
}

impl Billing {
    /// Where reports go.
    pub fn provider(&self) -> BillingProvider {
        self.settings.provider
    }

    /// The sink's state: outbox, windows, delivery counters.
    pub fn status(&self) -> Value {
        let mut status = match self.outbox.lock() {
            Ok(outbox) => status_of(&outbox, self.settings.provider),
            Err(_) => json!({}),
        };
        let view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        let metered: HashMap<(String, String), Decimal> = view
            .closed
            .iter()
            .map(|(c, f, q)| ((c.clone(), f.clone()), *q))
            .collect();
        if let Some(totals) = status["totals"].as_array_mut() {
            for total in totals.iter_mut() {
                let key = (
                    total["customer_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    total["feature"].as_str().unwrap_or_default().to_string(),
                );
                let closed = metered.get(&key).copied().unwrap_or_default();
                total["metered"] = json!(closed.normalize().to_string());
            }
        }
        status["open_windows"] = json!(view.open);
        status["watermark"] = if view.watermark == i64::MIN {
            Value::Null
        } else {
            json!(format_micros(view.watermark))
        };
        status["applied_seq"] = json!(view.seq);
        status["window"] = json!(crate::config::format_duration(self.settings.window.get()));
        status["grace"] = json!(crate::config::format_duration(self.settings.grace.get()));
        status["delivery"] = self
            .stats
            .lock()
            .map(|s| serde_json::to_value(&*s).unwrap_or_default())
            .unwrap_or_default();
        status
    }

    /// `POST /v1/billing/retry`: dead letters back in line. Returns how many.
    pub fn retry_dead(&self) -> Result<usize, BillingError> {
        let entries = match self.outbox.lock() {
            Ok(mut outbox) => outbox.retry_dead()?,
            Err(_) => Vec::new(),
        };
        let n = entries.len();
        if n > 0 {
            let _ = self.requeue.send(entries);
        }
        Ok(n)
    }
}
