//! northstar: a product-led-growth event pipeline.
//!
//! Product events arrive from SDKs over HTTP, NATS JetStream carries them into Parquet
//! partitions, and DataFusion answers SQL over them. See `DESIGN.md` in the team's shared
//! folder for the contracts; this crate is the one binary that serves them.
//!
//! # Layout
//!
//! Data flows down this list; dependencies point the same way (nothing reaches back up:
//! `tests/layers.rs` fails on an import circle between files or between these components).
//!
//! - [`config`]: the config file (the seed's template as a strict superset), validated once;
//! - [`catalog`]: every table's name, directory and schema, shared by its writer and by SQL;
//! - [`ingest`]: Segment and PostHog wires → validated [`event::EventRecord`]s;
//! - [`bus`]: NATS JetStream, embedded or external: streams, consumers, acked publishing;
//! - [`schema`]: what a valid event is (metered quantities today, the registry tomorrow);
//! - [`archive`]: the stream's exactly-once Parquet copy (commit protocol, recovery, compaction);
//! - [`meter`]: real-time usage per customer, feature and period; plans, limits, consume;
//! - [`identity`]: anonymous and identified ids joined into people (`events_resolved`);
//! - [`activation`]: "aha" thresholds from retained vs churned users, versioned;
//! - [`onboarding`]: per-person facts, triggers, onboarding steps and feature flags;
//! - [`query`]: DataFusion SQL over the archive, read-only and bounded;
//! - [`pipelines`]: windowed usage (`pipelines/*.sql`) recomputed as days change (table `usage`);
//! - [`resubmit`]: rejected messages replayed through today's validation, none stored twice;
//! - [`privacy`]: erasing a person (`DELETE /v1/persons/{id}`) through the phases [`erasure`] records;
//! - [`api`]: the HTTP server that fronts all of the above;
//! - [`server`]: `serve`, which starts and stops the components in order.
//!
//! The command line (`cli`, each subcommand a function) and `northstar bench` (our numbers
//! next to a baseline measured in the same run) are modules of the `northstar` binary
//! (`src/main.rs`), not of this library: tests and other programs link the server without
//! them, and the library's errors are all typed.
//!
//! Shared pieces: [`event`] and [`rejected`] (the records), [`erasure`] (the erasure log, which the followers, the archive and the API share), [`error`] (error kinds → HTTP
//! status), [`json`] (borrowed JSON objects), [`metrics`], [`clock`] (injectable time),
//! [`files`] (atomic durable writes), [`heap`] (what the allocator holds), [`disk`] (free space and the reserve kept on it), [`shutdown`] (stop signals), [`supervise`] (panics
//! caught, counted and shown by `/healthz`), [`client`] (a loopback HTTP
//! client), [`demo`] (the `make run` workload).

pub mod activation;
pub mod api;
pub mod archive;
pub mod billing;
pub mod bus;
pub mod catalog;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod disk;
pub mod erasure;
pub mod error;
pub mod event;
pub mod experiments;
pub mod files;
pub mod gateway;
pub mod heap;
pub mod identity;
pub mod ingest;
pub mod insights;
pub mod json;
pub mod meter;
pub mod meter_query;
pub mod metrics;
pub mod onboarding;
pub mod pg;
pub mod pipelines;
pub mod portal;
pub mod privacy;
pub mod query;
pub mod rejected;
pub mod replay;
pub mod resubmit;
pub mod schema;
pub mod server;
pub mod shutdown;
pub mod simulate;
pub mod supervise;
