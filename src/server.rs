//! `northstar serve`: wires the components together and takes them down in order.
//!
//! Start: everything that can be checked without NATS first (the data dir's lock, the schema
//! registry, the usage pipelines), so a mistake in them is said before any process is spawned;
//! then NATS (embedded child or `--nats-url`) → streams → archivers (recover, resume after their
//! manifests) → customers, then the stream followers (meter, identities, billing windows,
//! onboarding: snapshot + replay, on one shared consumer) → HTTP on the listener the caller
//! bound. Stop (SIGTERM, Ctrl-C, or the caller's shutdown future): HTTP stops accepting and
//! finishes the requests in flight → archivers commit what they hold and ack, the followers
//! write their snapshots → every background task ends → the embedded server stops. Every task
//! the server spawns is owned by [`RunningServer`] and awaited at stop; a panic in one is
//! counted and shown by `/healthz` (see [`crate::supervise`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::api::{self, AppState, ops::Health};
use crate::archive::{self, ArchiveTarget, EventsFormat, RejectedFormat};
use crate::bus::budget::Budget;
use crate::bus::follower::{Fanout, follow};
use crate::bus::{self, EmbeddedNats, Publisher, ensure_streams};
use crate::catalog;
use crate::clock::Clock;
use crate::config::Config;
use crate::ingest::Ingestor;
use crate::meter::customers::CustomerStore;
use crate::meter::runner::{self, MeterTarget};
use crate::meter::{Meter, notices};
use crate::metrics::Metrics;
use crate::query::QueryEngine;
use crate::supervise::Supervisor;

/// The durable consumer all in-process state follows the events stream through.
const FOLLOWERS_CONSUMER: &str = "followers";

/// Consumers of earlier releases, one per follower, deleted on start.
const RETIRED_CONSUMERS: &[&str] = &["meter", "identity", "onboarding", "billing"];

/// Free space the disk needs before a stalled embedded nats-server is restarted: enough for
/// it to recover its store and write again.
const ROOM_TO_RESTART_NATS: u64 = 16 * 1024 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// NATS could not be started or reached.
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// The archive could not be recovered or opened.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// The SQL engine could not open the tables.
    #[error(transparent)]
    Query(#[from] crate::query::QueryError),
    /// The Postgres wire could not start.
    #[error(transparent)]
    Pg(#[from] crate::pg::PgError),
    /// A pipeline definition is wrong.
    #[error(transparent)]
    Pipeline(#[from] crate::pipelines::PipelineError),
    /// An event schema is wrong.
    #[error(transparent)]
    Registry(#[from] crate::schema::RegistryError),
    /// The billing sink could not start.
    #[error(transparent)]
    Billing(#[from] crate::billing::BillingError),
    /// The listen address could not be bound, or the data dir created.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Everything `serve` needs.
pub struct ServeOptions {
    /// The validated config (with `NORTHSTAR_WRITE_KEY` already added).
    pub config: Config,
    /// The data dir (Parquet tables, manifests, the embedded JetStream store).
    pub data_dir: PathBuf,
    /// An external NATS server or cluster; `None` runs the embedded one.
    pub nats_url: Option<String>,
    /// The admin key; admin routes are closed without one.
    pub admin_key: Option<String>,
    /// A service key for the limits API, beside the config's `serviceKeys`.
    pub service_key: Option<String>,
    /// A read-only analyst key, beside the config's `analystKeys`.
    pub analyst_key: Option<String>,
    /// The clock events are stamped with.
    pub clock: Clock,
    /// Directory of the windowed usage pipelines (`pipelines/*.sql`); `None` for
    /// `./pipelines` when it exists, else the shipped ones.
    pub pipelines_dir: Option<PathBuf>,
    /// Stripe's keys (`STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET`).
    pub billing_secrets: crate::billing::Secrets,
}

/// A started server.
pub struct RunningServer {
    /// The address HTTP listens on.
    pub addr: SocketAddr,
    /// The address the Postgres wire listens on, when `sql.pgListen` is set.
    pub pg_addr: Option<SocketAddr>,
    /// The Postgres wire's accept loop.
    pg: Option<JoinHandle<()>>,
    /// The NATS URL in use (the embedded server's when embedded).
    pub nats_url: String,
    /// Committed sequence of the events archive.
    pub events_committed: watch::Receiver<u64>,
    stop_http: watch::Sender<bool>,
    stop_archivers: watch::Sender<bool>,
    stop_meter: watch::Sender<bool>,
    followers: JoinHandle<()>,
    /// The tasks beside the pipeline (customers, notices, billing delivery, the stream, disk
    /// and NATS watchers, scheduled recomputes): each ends on `stop_meter`.
    background: Vec<JoinHandle<()>>,
    /// `None` once it has ended and been awaited.
    http: Option<JoinHandle<()>>,
    archivers: Vec<JoinHandle<()>>,
    client: async_nats::Client,
    embedded: Option<Arc<tokio::sync::Mutex<EmbeddedNats>>>,
    /// Held until the server is dropped: one server per data dir.
    _lock: crate::files::DirLock,
}

/// Binds the HTTP address, before anything else starts: an address in use is said at once.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Io {
            context: format!("binding {listen}"),
            source,
        })
}

/// Starts everything and returns once HTTP is accepting requests on `listener`.
pub async fn start(
    options: ServeOptions,
    listener: TcpListener,
) -> Result<RunningServer, ServeError> {
    let ServeOptions {
        config,
        data_dir,
        nats_url,
        admin_key,
        service_key,
        analyst_key,
        clock,
        pipelines_dir,
        billing_secrets,
    } = options;
    std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::Io {
        context: format!("creating data dir {}", data_dir.display()),
        source,
    })?;
    let lock = match crate::files::lock_dir(&data_dir) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            return Err(ServeError::Io {
                context: format!("data dir {}", data_dir.display()),
                source: std::io::Error::other(
                    "another northstar process is running on it; stop it first, or pass another --data",
                ),
            });
        }
        Err(source) => {
            return Err(ServeError::Io {
                context: format!("locking data dir {}", data_dir.display()),
                source,
            });
        }
    };
    let erasures = crate::erasure::Erasures::open(
        &data_dir,
        usize::try_from(config.identity.max_erasures).unwrap_or(usize::MAX),
    )
    .map_err(|message| ServeError::Io {
        context: "opening the erasure log".into(),
        source: std::io::Error::other(message),
    })?;
    let erasures = Arc::new(erasures);
    let experiments =
        crate::experiments::Experiments::open(&data_dir).map_err(|message| ServeError::Io {
            context: "opening the activation experiments".into(),
            source: std::io::Error::other(message),
        })?;
    let admin_key = admin_key.filter(|k| !k.is_empty());
    let mut analyst_keys = config.analyst_keys.clone();
    analyst_keys.extend(analyst_key.filter(|k| !k.is_empty()));
    let pg = match config.sql.pg_listen {
        Some(addr) => {
            let keys = crate::pg::Keys::new(admin_key.as_deref(), &analyst_keys);
            Some(crate::pg::Prepared::bind(addr, keys, &config.sql).await?)
        }
        None => None,
    };
    let definitions = crate::pipelines::load(pipelines_dir.as_deref())?;
    let schema_dir = PathBuf::from(&config.registry.schema_dir);
    let registry = Arc::new(crate::schema::Registry::load(&config, Some(&schema_dir))?);
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        context: "reading the bound address".into(),
        source,
    })?;
    if config.sources.iter().all(|s| s.write_keys.is_empty()) {
        tracing::warn!(
            "no write keys configured: every ingest request will get 401; set NORTHSTAR_WRITE_KEY or add sources[] to the config"
        );
    }
    let config = Arc::new(config);
    let store_dir = data_dir.join("jetstream");
    let (embedded, nats_url, budget) = match nats_url {
        Some(url) => (None, url, None),
        None if config.stream.replicas > 1 => {
            return Err(ServeError::Bus(bus::BusError::Management {
                action: "start the embedded nats-server",
                message: format!(
                    "stream.replicas is {}, but the embedded nats-server is one server: pass --nats-url with the URLs of a NATS cluster, or set stream.replicas to 1",
                    config.stream.replicas
                ),
            }));
        }
        None => {
            let budget = Budget::embedded(&config.stream, &store_dir);
            let server = EmbeddedNats::start(&store_dir, budget.store).await?;
            let url = server.url().to_string();
            (Some(server), url, Some(budget))
        }
    };
    let client = bus::connect_ready(&nats_url, Duration::from_secs(30)).await?;
    let publisher = Publisher::new(client.clone(), &config.stream);
    let budget = match budget {
        Some(budget) => budget,
        None => Budget::external(
            &config.stream,
            bus::streams::account_storage_limit(publisher.jetstream()).await,
        ),
    };
    if budget.events < 0 && config.stream.max_age.get().is_zero() {
        tracing::warn!(
            "the events stream keeps everything forever (stream.maxAge 0 and no size bound): set stream.maxAge or stream.maxBytes"
        );
    }
    tracing::info!(
        store_max_bytes = budget.store,
        events_max_bytes = budget.events,
        rejected_max_bytes = budget.rejected,
        max_age = %crate::config::format_duration(config.stream.max_age.get()),
        "stream retention"
    );
    // The portal stream first: when the store shrank (a fuller disk), its bound follows the
    // store before the events stream asks for its share. Portal events are a courtesy to
    // browsers: a stream that cannot be made turns them off, not the server.
    if let Err(error) =
        crate::bus::streams::ensure_portal_stream(publisher.jetstream(), &config.stream, &budget)
            .await
    {
        tracing::warn!(%error, "the portal stream could not be made: GET /v1/portal/events answers 503 until it can");
    }
    let in_force = ensure_streams(publisher.jetstream(), &config.stream, &budget).await?;

    let metrics = Arc::new(Metrics::default());
    let supervisor = Supervisor::new(metrics.clone());
    let (stop_archivers, archivers_stop) = watch::channel(false);
    let (stop_meter, meter_stop) = watch::channel(false);
    let mut background = Vec::new();
    // The follower loop hands each event on to the events archiver (see `archive::Feed`).
    let (feed_tx, feed) = match config.archive.feed_capacity {
        0 => (None, None),
        capacity => {
            let (tx, rx) = tokio::sync::mpsc::channel(capacity);
            (Some(tx), Some(rx))
        }
    };
    let events = archive::start(
        EventsFormat,
        publisher.jetstream().clone(),
        ArchiveTarget {
            stream: config.stream.name.clone(),
            consumer: "archiver-events".into(),
            dir: data_dir.join(catalog::EVENTS.dir),
            feed,
            retention: kept_for(&config.archive.retention.events),
            erasures: Some(erasures.clone()),
        },
        config.archive.clone(),
        metrics.archive_events.clone(),
        archivers_stop.clone(),
    )
    .await?;
    let rejected = archive::start(
        RejectedFormat,
        publisher.jetstream().clone(),
        ArchiveTarget {
            stream: config.stream.rejected_name.clone(),
            consumer: "archiver-rejected".into(),
            dir: data_dir.join(catalog::REJECTED_EVENTS.dir),
            feed: None,
            retention: kept_for(&config.archive.retention.rejected),
            erasures: None,
        },
        config.archive.clone(),
        metrics.archive_rejected.clone(),
        archivers_stop.clone(),
    )
    .await?;
    let archivers_stop_for_pipelines = archivers_stop;

    let customers = Arc::new(
        CustomerStore::open(
            publisher.jetstream(),
            config.stream.replicas,
            &config.metering.default_plan,
            config.metering.period,
        )
        .await?,
    );
    background.push(supervisor.spawn(
        "customers",
        customers.clone().follow(stop_meter.subscribe()),
    ));
    let (notice_tx, notice_rx) = notices::channel();
    let meter = Arc::new(Meter::new(
        &config,
        customers.clone(),
        publisher.clone(),
        notice_tx,
        metrics.clone(),
        clock.clone(),
    ));
    let js = publisher.jetstream().clone();
    let mut followers = vec![
        runner::prepare(
            meter.clone(),
            &js,
            MeterTarget {
                stream: config.stream.name.clone(),
                dir: data_dir.join("meter"),
                snapshot_interval: config.metering.snapshot_interval.get(),
            },
        )
        .await?,
    ];
    let (identity, _identity_stats) = crate::identity::prepare(
        &js,
        crate::identity::IdentityTarget {
            stream: config.stream.name.clone(),
            data_dir: data_dir.clone(),
            snapshot_interval: Duration::from_secs(1),
            max_ids: config.identity.max_ids,
        },
    )
    .await?;
    followers.push(identity);
    let billing = match crate::billing::start(
        &config,
        billing_secrets,
        &js,
        crate::billing::BillingTarget {
            stream: &config.stream.name,
            data_dir: &data_dir,
        },
        customers.clone(),
        clock.clone(),
        stop_meter.subscribe(),
    )
    .await?
    {
        Some(started) => {
            followers.push(started.follower);
            background.push(supervisor.spawn("billing-delivery", started.delivery));
            Some(started.billing)
        }
        None => None,
    };
    background.push(supervisor.spawn(
        "notices",
        notices::run(
            notice_rx,
            client.clone(),
            customers,
            config.metering.threshold_webhook.clone(),
            clock.clone(),
            stop_meter.subscribe(),
        ),
    ));

    let live = crate::query::tables::LiveTables {
        events: Some(events.live.clone()),
        rejected: Some(rejected.live.clone()),
    };
    let query = Arc::new(QueryEngine::open_live(&data_dir, &config, &live).await?);
    let (pipelines_tx, pipelines_progress) = watch::channel(0);
    let pipelines_task = supervisor.spawn(
        "pipelines",
        crate::pipelines::run(
            definitions,
            query.clone(),
            events.committed.clone(),
            pipelines_tx,
            config.metering.pipeline_interval.get(),
            supervisor.clone(),
            archivers_stop_for_pipelines,
        ),
    );
    let ingestor = Ingestor::new(
        config.clone(),
        registry,
        publisher.clone(),
        metrics.clone(),
        clock.clone(),
    );
    ingestor.backlog().retain(in_force.events);
    ingestor.backlog().retain_for(config.stream.max_age.get());
    {
        let (admission, backlog) = (ingestor.admission(), ingestor.backlog().clone());
        meter.set_gate(crate::meter::StreamGate {
            admit: Box::new(move |events| {
                admission(events).map_err(|e| crate::error::Refused::of(&e))
            }),
            acked: Box::new(move |seq| backlog.acked(seq)),
        });
    }
    background.push(supervisor.spawn(
        "stream-state",
        watch_stream(
            publisher.jetstream().clone(),
            config.stream.name.clone(),
            (in_force.events, budget.events),
            (config.stream.rejected_name.clone(), in_force.rejected),
            ingestor.backlog().clone(),
            metrics.clone(),
            stop_meter.subscribe(),
        ),
    ));
    {
        let mut watched = vec![
            data_dir.clone(),
            data_dir.join(catalog::EVENTS.dir),
            data_dir.join(catalog::REJECTED_EVENTS.dir),
        ];
        if embedded.is_some() {
            watched.push(store_dir.clone());
        }
        background.push(supervisor.spawn(
            "disk",
            ingestor.disk().clone().run(
                watched,
                config.storage.check_interval.get(),
                stop_meter.subscribe(),
            ),
        ));
    }
    let embedded = embedded.map(|server| Arc::new(tokio::sync::Mutex::new(server)));
    let jetstream_health = ingestor.jetstream().clone();
    {
        let disk = ingestor.disk().clone();
        background.push(supervisor.spawn(
            "jetstream-watch",
            crate::bus::watch::watch(
                client.clone(),
                embedded.clone(),
                move || !disk.is_full() && disk.free_bytes() >= ROOM_TO_RESTART_NATS,
                jetstream_health.clone(),
                config.storage.check_interval.get(),
                stop_meter.subscribe(),
            ),
        ));
    }
    let activation_store = crate::activation::ActivationStore::open(&data_dir);
    let question = crate::activation::Question::from_config(&config);
    if !config.activation.schedule.get().is_zero() {
        background.push(supervisor.spawn(
            "activation",
            recompute_on_schedule(
                query.clone(),
                question.clone(),
                activation_store.clone(),
                config.activation.schedule.get(),
                clock.clone(),
                stop_meter.subscribe(),
            ),
        ));
    }
    let plans_of = meter.customers().clone();
    let onboarding = Arc::new(crate::onboarding::Onboarding::new(
        &config,
        activation_store.clone(),
        Box::new(move |customer| plans_of.terms(customer).plan.clone()),
    ));
    let (onboarding_part, trigger_delivery) = crate::onboarding::prepare(
        onboarding.clone(),
        &js,
        client.clone(),
        &config.stream.name,
        &data_dir,
        config.onboarding.trigger_webhook.clone(),
        &supervisor,
    )
    .await?;
    followers.push(onboarding_part);
    background.push(trigger_delivery);
    let followers = Fanout::new(followers)
        .supervised(supervisor.clone())
        .with_erasures(erasures.clone());
    background.push(supervisor.spawn(
        "erasures",
        crate::privacy::run(
            erasures.clone(),
            js.clone(),
            config.stream.name.clone(),
            query.clone(),
            stop_meter.subscribe(),
        ),
    ));
    {
        // The meter takes each event in when its publish is acked, before the client hears
        // back: `/v1/check` is fresh whatever the followers' backlog.
        let meter = meter.clone();
        ingestor.on_stored(Box::new(move |seq, message| {
            if let Ok(event) = crate::event::EventView::decode(message) {
                meter.apply_acked(seq, &event);
            }
        }));
    }
    {
        // New customers past `metering.maxCustomers` are refused at the door, kept in the
        // rejected store.
        let meter = meter.clone();
        ingestor.admits(Box::new(move |message| meter.admits_message(message)));
    }
    {
        let (meter, committed) = (meter.clone(), events.committed.clone());
        ingestor.backlog().watch(crate::ingest::backlog::Readers {
            followers: Box::new(move || meter.counters().applied_seq()),
            followers_saved: Box::new(followers.saved_position()),
            archive: Box::new(move || *committed.borrow()),
        });
        let rejected_committed = rejected.committed.clone();
        ingestor
            .backlog()
            .watch_rejected(Box::new(move || *rejected_committed.borrow()));
    }
    let mut spec = followers.spec(&config.stream.name, FOLLOWERS_CONSUMER);
    spec.lost = metrics.followers_lost.clone();
    crate::bus::streams::delete_consumers(&js, &config.stream.name, RETIRED_CONSUMERS).await;
    // Limits answer only once the meter holds everything the stream held at start.
    let (first_seq, start_seq) = crate::bus::streams::sequences(&js, &config.stream.name).await?;
    meter.replay_until(start_seq);
    // What the stream held at start was acked before: the readers' lag, and what retention
    // may drop, count from there, not from the first ack of this run.
    ingestor.backlog().acked(start_seq);
    // What the stream no longer holds (retention dropped it) is read back from Parquet first.
    let history = (spec.after_seq + 1 < first_seq).then(|| {
        let archived = *events.committed.borrow();
        (spec.after_seq, archived.min(first_seq - 1))
    });
    // The followers run on a thread of their own: under a flood of requests the main
    // runtime's workers are busy with HTTP, and the followers' lag (which bounds SQL
    // freshness, as the archiver reads their feed) would grow until ingest sheds.
    let followers = supervisor
        .spawn_on_own_thread("followers", {
            let (query, meter, supervisor) = (query.clone(), meter.clone(), supervisor.clone());
            let (mut spec, mut followers) = (spec, followers);
            async move {
                if let Some((after, upto)) = history.filter(|(after, upto)| upto > after) {
                    match crate::replay::from_parquet(&query, &mut followers, after, upto).await {
                        Ok(reached) => spec.after_seq = reached,
                        // The followers go on from the stream, but their state lacks what only
                        // Parquet held: said by /healthz, and the limits API answers 503 rather
                        // than an undercount.
                        Err(error) => {
                            let reason = format!(
                                "replaying sequences {after}..={upto} from Parquet failed: {error}"
                            );
                            meter.mark_incomplete(reason.clone());
                            supervisor.failing("replay from Parquet", reason);
                        }
                    }
                }
                follow(js, spec, followers, meter_stop, feed_tx).await
            }
        })
        .map_err(|source| ServeError::Io {
            context: "starting the followers' thread".into(),
            source,
        })?;
    let mut service_keys = config.service_keys.clone();
    service_keys.extend(service_key.filter(|k| !k.is_empty()));
    let portal = crate::portal::PortalKeys::open(&data_dir).map_err(|source| ServeError::Io {
        context: "opening the portal token secret".into(),
        source,
    })?;
    let (stop_http, mut http_stop) = watch::channel(false);
    let state = Arc::new(AppState {
        portal_streams: Arc::new(Semaphore::new(config.metering.portal_max_streams)),
        stopping: stop_http.subscribe(),
        portal: Arc::new(portal),
        permits: Arc::new(Semaphore::new(config.ingest.max_concurrent_requests)),
        billing,
        config: config.clone(),
        ingestor,
        query,
        metrics,
        admin_key,
        service_keys,
        analyst_keys,
        meter,
        clock,
        activation: activation_store.clone(),
        onboarding,
        erasures,
        experiments: Arc::new(experiments),
        question: question.clone(),
        verify: crate::meter::verify::Positions {
            js: publisher.jetstream().clone(),
            stream: config.stream.name.clone(),
            archived: events.committed.clone(),
            pipelines: pipelines_progress,
        },
        health: Health {
            supervisor,
            publisher,
            events_stream: config.stream.name.clone(),
            archived: vec![
                (catalog::EVENTS.name, events.committed.clone()),
                (catalog::REJECTED_EVENTS.name, rejected.committed.clone()),
            ],
            jetstream: jetstream_health,
        },
    });
    let pg_addr = pg.as_ref().and_then(crate::pg::Prepared::local_addr);
    let pg = match pg {
        Some(pg) => Some(pg.start(&state.query, &config.sql, stop_http.subscribe())?),
        None => None,
    };
    if let Some(pg_addr) = pg_addr {
        tracing::info!(%pg_addr, "Postgres wire listening");
    }
    let http = tokio::spawn(api::serve(listener, state, async move {
        let _ = http_stop.wait_for(|stop| *stop).await;
    }));
    tracing::info!(%addr, nats = %nats_url, data = %data_dir.display(), "northstar serving");
    Ok(RunningServer {
        addr,
        pg_addr,
        pg,
        nats_url,
        events_committed: events.committed,
        stop_http,
        stop_archivers,
        stop_meter,
        followers,
        background,
        http: Some(http),
        archivers: vec![events.task, rejected.task, pipelines_task],
        client,
        embedded,
        _lock: lock,
    })
}

impl RunningServer {
    /// Serves until `shutdown` resolves (or the HTTP server ends on its own, which only a
    /// panic in it does), then stops in order.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        if let Some(http) = self.http.as_mut() {
            tokio::select! {
                () = shutdown => {}
                _ = http => {
                    tracing::error!("the HTTP server ended; stopping");
                    self.http = None;
                }
            }
        }
        self.stop().await;
    }

    /// Stops in order: HTTP drains, archivers commit and ack, the followers snapshot, the
    /// background tasks end, NATS stops.
    pub async fn stop(self) {
        let _ = self.stop_http.send(true);
        if let Some(pg) = self.pg {
            let _ = pg.await;
        }
        if let Some(http) = self.http {
            let _ = http.await;
        }
        let _ = self.stop_archivers.send(true);
        let _ = self.stop_meter.send(true);
        for task in self.archivers {
            let _ = task.await;
        }
        let _ = self.followers.await;
        for task in self.background {
            let _ = task.await;
        }
        let _ = self.client.flush().await;
        drop(self.client);
        if let Some(embedded) = self.embedded {
            embedded.lock().await.stop().await;
        }
        tracing::info!("northstar stopped");
    }
}

/// Recomputes the activation threshold every `every`, starting one period after start (a
/// recompute also happens on `POST /v1/activation/recompute` and `northstar aha`).
/// A table's retention: none when the setting is "0" (kept for ever).
fn kept_for(setting: &crate::config::HumanDuration) -> Option<Duration> {
    Some(setting.get()).filter(|kept| !kept.is_zero())
}

async fn recompute_on_schedule(
    engine: Arc<QueryEngine>,
    question: crate::activation::Question,
    store: Arc<crate::activation::ActivationStore>,
    every: Duration,
    clock: Clock,
    mut stop: crate::shutdown::Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            () = crate::shutdown::wait_for_stop(&mut stop) => return,
        }
        match crate::activation::recompute(
            &engine,
            &question,
            &store,
            None,
            clock.now_micros(),
            &|_| {},
        )
        .await
        {
            Ok((_, version)) => {
                tracing::info!(version = version.version, chosen = ?version.chosen.map(|c| (c.times, c.days)), "activation recomputed")
            }
            Err(error) => tracing::warn!(%error, "scheduled activation recompute gave no answer"),
        }
    }
}

/// Reads the events stream's state twice a second: how many messages it holds tells
/// admission how close retention is to what the readers have not read; the rest is shown by
/// `/metrics`.
async fn watch_stream(
    js: async_nats::jetstream::Context,
    stream: String,
    (mut in_force, wanted): (i64, i64),
    (rejected, rejected_bound): (String, i64),
    backlog: Arc<crate::ingest::backlog::Backlog>,
    metrics: Arc<Metrics>,
    mut stop: crate::shutdown::Shutdown,
) {
    loop {
        // A bound kept above the budget at start (the stream held more) comes down once
        // every reader has saved what the stream holds: the oldest messages it then drops
        // are in Parquet and in every snapshot.
        if in_force != wanted && backlog.unsaved() == Some(0) {
            match crate::bus::streams::apply_budget(&js, &stream, wanted).await {
                Ok(()) => {
                    tracing::info!(%stream, max_bytes = wanted, "the stream's size bound is its budget again");
                    backlog.retain(wanted);
                    in_force = wanted;
                }
                Err(error) => {
                    tracing::warn!(%stream, %error, "the stream's size bound could not be lowered yet")
                }
            }
        }
        if let Ok(Ok(handle)) =
            tokio::time::timeout(Duration::from_secs(2), js.get_stream(stream.as_str())).await
        {
            let state = &handle.cached_info().state;
            backlog.held(state.messages, state.bytes);
            backlog.sample(u64::try_from(crate::clock::system_micros() / 1_000_000).unwrap_or(0));
            metrics.stream_messages.set(state.messages);
            metrics.stream_bytes.set(state.bytes);
            metrics.stream_first_seq.set(state.first_sequence);
            metrics.stream_last_seq.raise(state.last_sequence);
        }
        if let Ok(Ok(handle)) =
            tokio::time::timeout(Duration::from_secs(2), js.get_stream(rejected.as_str())).await
        {
            let state = &handle.cached_info().state;
            backlog.rejected_held(rejected_bound, state.messages, state.bytes);
            // Whatever the stream holds was acked, before this run too.
            backlog.rejected_acked(state.last_sequence);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = crate::shutdown::wait_for_stop(&mut stop) => return,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
