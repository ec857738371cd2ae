//! The integration-test harness: a real nats-server on a free port in a temp dir, a real
//! `northstar serve` process against it on 127.0.0.1:0, and helpers that read like the
//! scenarios they check. Everything is cleaned up on drop; either process can be killed with
//! SIGKILL and restarted on the same store.
// Each test binary uses a part of the harness; its items are `pub` for the binaries, not for
// a library.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use northstar::client::{ClientResponse, HttpClient, basic_auth};
use northstar::config::Config;
use northstar::query::QueryEngine;
use serde_json::{Value, json};

pub mod billing;
pub mod stripe;

/// The write key every test config carries.
pub const WRITE_KEY: &str = "wk_test_0123456789";
/// The admin key every test server gets.
pub const ADMIN_KEY: &str = "ak_test_0123456789";
/// Stripe's secret key as the fake Stripe server expects it.
pub const STRIPE_SECRET_KEY: &str = "sk_test_northstar";
/// The Stripe webhook signing secret of the tests.
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_test_northstar";

/// Polls `probe` every 20 ms until it answers `Ok`, and returns that; fails the test with the
/// last `Err` (what was seen instead) once `within` has passed. Every "wait until" of the tests.
pub async fn eventually<T>(
    within: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "not so after {within:?}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A nats-server child process with JetStream, its store in a temp dir.
pub struct Nats {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
}

impl Nats {
    /// Starts a server on a port it picks itself (reported through its ports file).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (child, port) = spawn_nats(dir.path(), None);
        Self {
            child: Some(child),
            url: format!("nats://127.0.0.1:{port}"),
            dir,
            port,
        }
    }

    /// SIGKILL: the server disappears mid-whatever.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn_nats(self.dir.path(), Some(self.port));
        self.child = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of real nats-server processes on loopback: client and route ports picked free,
/// JetStream on each with its own store, every node routed to every other. Any node can be
/// killed (SIGKILL) and started again on its store.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    /// Every node's client URL, comma separated (what `--nats-url` takes).
    pub url: String,
}

struct ClusterNode {
    child: Option<Child>,
    dir: tempfile::TempDir,
    name: String,
    port: u16,
    route_port: u16,
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsCluster {
    /// Starts `n` clustered servers and waits until JetStream answers on the cluster.
    pub async fn start(n: usize) -> Self {
        let mut nodes: Vec<ClusterNode> = (0..n)
            .map(|i| ClusterNode {
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                name: format!("n{}", i + 1),
                port: free_port(),
                route_port: free_port(),
            })
            .collect();
        let routes = nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.route_port))
            .collect::<Vec<_>>()
            .join(",");
        for node in &mut nodes {
            node.child = Some(spawn_cluster_node(node, &routes));
        }
        let url = nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = Self { nodes, url };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Waits until the cluster's JetStream can place a stream on every node (a meta leader is
    /// elected and every node has joined).
    pub async fn wait_for_jetstream(&self) {
        let client = async_nats::connect(self.url.split(',').collect::<Vec<_>>())
            .await
            .expect("connect to the cluster");
        let js = async_nats::jetstream::new(client);
        let replicas = self.nodes.len();
        eventually(Duration::from_secs(60), async || {
            let config = async_nats::jetstream::stream::Config {
                name: "HARNESS_READY".into(),
                subjects: vec!["harness.ready".into()],
                num_replicas: replicas,
                ..Default::default()
            };
            js.create_stream(config).await.map_err(|e| e.to_string())?;
            js.delete_stream("HARNESS_READY")
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let routes = self
            .nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let child = spawn_cluster_node(&self.nodes[i], &routes);
        self.nodes[i].child = Some(child);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

// The child is handed to `NatsCluster`, which kills and waits for it on drop.
#[allow(clippy::zombie_processes)]
fn spawn_cluster_node(node: &ClusterNode, routes: &str) -> Child {
    let child = Command::new(nats_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &node.port.to_string()])
        .args([
            "--server_name",
            &node.name,
            "--cluster_name",
            "northstar-test",
        ])
        .arg("--cluster")
        .arg(format!("nats://127.0.0.1:{}", node.route_port))
        .args(["--routes", routes])
        .arg("-sd")
        .arg(node.dir.path().join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server {} did not start",
            node.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn nats_binary() -> PathBuf {
    northstar::bus::embedded::find_nats_server()
        .expect("nats-server is not installed: run ./scripts/install-deps.sh")
}

// The child is handed to `Nats`, which kills and waits for it on drop.
#[allow(clippy::zombie_processes)]
fn spawn_nats(dir: &Path, port: Option<u16>) -> (Child, u16) {
    let ports = dir.join("ports");
    let _ = std::fs::remove_dir_all(&ports);
    std::fs::create_dir_all(&ports).expect("ports dir");
    let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
    let mut child = Command::new(nats_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg])
        .arg("-sd")
        .arg(dir.join("store"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = std::fs::read_dir(&ports)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| std::fs::read_to_string(e.path()).ok())
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v["nats"][0].as_str().map(str::to_string));
        if let Some(url) = found {
            let port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            return (child, port);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The config every test starts from: the seed's template plus a test source.
pub fn test_config() -> Value {
    let mut config: Value = serde_json::from_str(include_str!("../fixtures/config-template.json"))
        .expect("seed template");
    config["sources"] = json!([{"name": "test", "writeKeys": [WRITE_KEY]}]);
    config["archive"] = json!({"commitInterval": "200ms"});
    // The tests' events carry fixed dates of 2026: they must not age out as the calendar
    // moves (the default bound has its own test).
    config["ingest"] = json!({"maxEventAge": "0"});
    config
}

/// A `northstar serve` child process.
pub struct Northstar {
    child: Option<Child>,
    /// Its HTTP API (the methods of [`Api`] are the server's, through `Deref`).
    pub api: Api,
    /// `host:port` of its Postgres wire, when `sql.pgListen` is set.
    pub pg_addr: Option<String>,
    pub data: PathBuf,
    config_path: PathBuf,
    nats_url: Option<String>,
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for Northstar {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Northstar {
    /// Replaces the config the next [`Northstar::restart`] reads.
    pub fn set_config(&self, config: &Value) {
        std::fs::write(
            &self.config_path,
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .expect("write config");
    }

    /// Starts northstar against `nats` with `config`, in a fresh data dir.
    pub fn start(nats: &Nats, config: &Value) -> Self {
        Self::launch(Some(nats.url.clone()), config, &[])
    }

    /// Starts northstar with its own embedded nats-server (the `make run` default).
    pub fn start_embedded(config: &Value) -> Self {
        Self::launch(None, config, &[])
    }

    /// Starts northstar with its own embedded nats-server and extra environment variables.
    pub fn start_embedded_with_env(config: &Value, env: &[(&str, &str)]) -> Self {
        Self::launch(None, config, env)
    }

    /// Starts northstar against a NATS URL of the caller's (a proxy in front of the server).
    pub fn start_at(nats_url: &str, config: &Value) -> Self {
        Self::launch(Some(nats_url.to_string()), config, &[])
    }

    /// Starts northstar against `nats` with extra environment variables.
    pub fn start_with_env(nats: &Nats, config: &Value, env: &[(&str, &str)]) -> Self {
        Self::launch(Some(nats.url.clone()), config, env)
    }

    /// Starts northstar on a data dir of the caller's (a small filesystem mounted for the
    /// test), against `nats_url` or, with `None`, its embedded nats-server.
    pub fn start_in(data: &Path, nats_url: Option<String>, config: &Value) -> Self {
        Self::launch_in(nats_url, config, &[], Some(data.to_path_buf()))
    }

    fn launch(nats_url: Option<String>, config: &Value, env: &[(&str, &str)]) -> Self {
        Self::launch_in(nats_url, config, env, None)
    }

    fn launch_in(
        nats_url: Option<String>,
        config: &Value,
        env: &[(&str, &str)],
        data: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = data.unwrap_or_else(|| dir.path().join("data"));
        let config_path = dir.path().join("northstar.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let mut server = Self {
            child: None,
            api: Api::new(String::new()),
            pg_addr: None,
            data,
            config_path,
            nats_url,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: Some(dir),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_northstar"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data")
            .arg(&self.data)
            .arg("--pipelines")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"))
            .args(["--listen", "127.0.0.1:0"])
            .env("NORTHSTAR_ADMIN_KEY", ADMIN_KEY)
            .env("NORTHSTAR_ANALYST_KEY", ANALYST_KEY)
            .env_remove("NORTHSTAR_WRITE_KEY")
            .env_remove("NORTHSTAR_NATS_URL")
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = &self.nats_url {
            command.arg("--nats-url").arg(url);
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn northstar");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut pg = None;
            while let Some(Ok(line)) = lines.next() {
                // Printed before the HTTP line, when the Postgres wire is on.
                if let Some(rest) = line.strip_prefix("Postgres wire on ") {
                    pg = rest.split(": ").next().map(str::to_string);
                }
                if let Some(url) = line.strip_prefix("northstar listening on ") {
                    let _ = tx.send((url.to_string(), pg.take()));
                }
            }
        });
        (self.api.base, self.pg_addr) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("northstar did not start listening within 60 s");
        self.child = Some(child);
    }

    /// The pid of the server process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `kill -9`: no shutdown, no final commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the graceful path (drain, commit, ack).
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data dir (a new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Runs SQL over the data dir with the real engine (no server involved), rows as JSON.
    pub async fn sql(&self, sql: &str) -> Vec<Value> {
        query(&self.data, sql).await
    }

    /// Waits until the events archive has committed at least `rows` rows (per its manifest).
    pub async fn wait_archived(&self, rows: u64) {
        wait_archived(&self.data, rows).await
    }
}

/// A running server's HTTP API, with the keys the test servers accept: what the tests say
/// to a server, whether it runs as a process ([`Northstar`]) or in the test ([`InProcess`]).
pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub client: HttpClient,
}

impl Api {
    fn new(base: String) -> Self {
        Self {
            base,
            client: HttpClient::new(),
        }
    }

    /// POST `body` to `path` with the test write key as Basic auth.
    pub async fn post(&self, path: &str, body: &Value) -> ClientResponse {
        let auth = basic_auth(WRITE_KEY);
        self.client
            .post_json(
                &format!("{}{path}", self.base),
                &[("authorization", &auth)],
                body,
            )
            .await
            .expect("request answered")
    }

    /// POSTs `events` as one Segment batch with the test write key, and fails the test
    /// unless all of them are stored; returns the answer's JSON.
    pub async fn send_batch(&self, events: impl IntoIterator<Item = Value>) -> Value {
        let events: Vec<Value> = events.into_iter().collect();
        let answer = self.post("/v1/batch", &json!({ "batch": events })).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let body = answer.json();
        assert!(
            body.get("errors").is_none(),
            "some events were refused: {body}"
        );
        body
    }

    /// POST raw bytes with the given headers.
    pub async fn post_raw(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> ClientResponse {
        self.client
            .send(
                http::Method::POST,
                &format!("{}{path}", self.base),
                headers,
                body,
            )
            .await
            .expect("request answered")
    }

    /// GET a path.
    pub async fn get(&self, path: &str) -> ClientResponse {
        self.client
            .get(&format!("{}{path}", self.base), &[])
            .await
            .expect("request answered")
    }

    /// POST /v1/sql as admin; returns the JSON answer.
    pub async fn sql_api(&self, sql: &str) -> ClientResponse {
        self.post_as(ADMIN_KEY, "/v1/sql", &json!({"sql": sql}))
            .await
    }

    /// Runs SQL through the server's `POST /v1/sql` (the archivers' buffers included), rows
    /// as JSON; fails the test on any answer but 200.
    pub async fn live_sql(&self, sql: &str) -> Vec<Value> {
        let answer = self.sql_api(sql).await;
        assert_eq!(answer.status, 200, "{sql}: {}", answer.text());
        match answer.json()["rows"].take() {
            Value::Array(rows) => rows,
            other => panic!("{sql}: not rows: {other}"),
        }
    }

    /// GET with a bearer key (a service key for the limits API).
    pub async fn get_as(&self, key: &str, path: &str) -> ClientResponse {
        let bearer = format!("Bearer {key}");
        self.client
            .get(
                &format!("{}{path}", self.base),
                &[("authorization", &bearer)],
            )
            .await
            .expect("answered")
    }

    /// POST JSON with a bearer key.
    pub async fn post_as(&self, key: &str, path: &str, body: &Value) -> ClientResponse {
        let bearer = format!("Bearer {key}");
        self.client
            .post_json(
                &format!("{}{path}", self.base),
                &[("authorization", &bearer)],
                body,
            )
            .await
            .expect("answered")
    }

    /// PUT JSON with the admin key.
    pub async fn put_admin(&self, path: &str, body: &Value) -> ClientResponse {
        let bearer = format!("Bearer {ADMIN_KEY}");
        self.client
            .send(
                http::Method::PUT,
                &format!("{}{path}", self.base),
                &[
                    ("authorization", &bearer),
                    ("content-type", "application/json"),
                ],
                body.to_string().into_bytes(),
            )
            .await
            .expect("answered")
    }
}

impl Drop for Northstar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The dashboard's DOM once its script has loaded `view` (`name` or `name&param=value`) in
/// headless Chromium (`--dump-dom`), and what the browser wrote to stderr. Fails the test on a
/// script error, a policy violation or an error the page shows.
pub fn render_dashboard(base: &str, key: &str, view: &str) -> (String, String) {
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=20000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(format!("{base}/dashboard#key={key}&view={view}"))
        .output()
        .expect("chromium runs (./scripts/install-deps.sh --test installs it)");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let loaded = view.split('&').next().unwrap_or(view);
    assert!(
        dom.contains(&format!("data-loaded=\"{loaded}\"")),
        "the {view} view did not finish loading:\n{dom}\n{log}"
    );
    assert!(
        dom.contains("role=\"alert\"></p>"),
        "the page shows an error:\n{dom}"
    );
    assert!(!log.contains("Uncaught"), "a script error:\n{log}");
    assert!(
        !log.contains("Content Security Policy"),
        "a CSP violation:\n{log}"
    );
    (dom, log)
}

/// The value of the metric line starting with `name` (its labels and a space included, as
/// `northstar_disk_full ` or `northstar_consumer_lag{reader="archive"} `) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Runs SQL over a data dir with the real engine, rows as JSON objects.
pub async fn query(data: &Path, sql: &str) -> Vec<Value> {
    let config: Config =
        Config::from_json(&test_config().to_string(), "test").expect("test config");
    let engine = QueryEngine::open(data, &config).await.expect("open tables");
    let result = engine
        .run(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    match northstar::query::output::rows_json(&result.batches).expect("rows as JSON") {
        Value::Array(rows) => rows,
        other => panic!("not rows: {other}"),
    }
}

/// A single number from SQL (`SELECT count(*) …`).
pub async fn scalar(data: &Path, sql: &str) -> i64 {
    let rows = query(data, sql).await;
    let row = rows.first().and_then(Value::as_object).expect("one row");
    row.values()
        .next()
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{sql}: not a number: {row:?}"))
}

/// Waits (up to 30 s) until `table` of the data dir has at least `rows` rows.
pub async fn wait_rows(data: &Path, table: &str, rows: usize) {
    eventually(Duration::from_secs(30), async || {
        let n = scalar(data, &format!("SELECT count(*) FROM {table}")).await;
        match usize::try_from(n).unwrap_or(0) >= rows {
            true => Ok(()),
            false => Err(format!("{table} has {n} of {rows} rows")),
        }
    })
    .await
}

/// Waits until `identities` holds a row for every identify of `messages` that names both ids.
pub async fn wait_identified(data: &Path, messages: &[Value]) {
    let identified = messages
        .iter()
        .filter(|m| m["type"] == "identify" && m.get("anonymousId").is_some())
        .count();
    wait_rows(data, "identities", identified).await
}

/// Waits (up to a minute) until the events manifest counts `rows` committed rows.
pub async fn wait_archived(data: &Path, rows: u64) {
    eventually(Duration::from_secs(60), async || {
        let manifest =
            northstar::archive::ArchiveManifest::load(&data.join("events")).unwrap_or_default();
        match manifest.rows >= rows {
            true => Ok(()),
            false => Err(format!("{} of {rows} rows archived", manifest.rows)),
        }
    })
    .await
}

/// Segment track messages with ids `"{prefix}-{i}"` for `i` in `range`, spread over three
/// days (so commits touch several partitions) and five customers.
pub fn tracks(prefix: &str, range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| {
            json!({
                "type": "track",
                "messageId": format!("{prefix}-{i}"),
                "userId": format!("user-{}", i % 17),
                "event": "api_call_made",
                "timestamp": format!("2026-03-0{}T05:06:07.000Z", 4 + i % 3),
                "context": {"groupId": format!("cust-{}", i % 5)},
                "properties": {"endpoint": "/v1/search", "n": i}
            })
        })
        .collect()
}

/// Every file under `dir` that is neither a committed Parquet file nor a manifest: temp
/// files and compaction journals left behind.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if !(name.starts_with("part-") && name.ends_with(".parquet"))
                && name != "_manifest.json"
            {
                found.push(path);
            }
        }
    }
    found
}

/// A TCP proxy in front of a server, whose connections can be cut while the server stays up:
/// a network failure between northstar and NATS, without losing the server's state.
pub struct CutProxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CutProxy {
    /// Listens on a free port and forwards every connection to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection (new ones are accepted again).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// The read-only analyst key every test server accepts (SQL and the Postgres wire).
pub const ANALYST_KEY: &str = "ak_test_0123456789abcdef";

/// The service key every test server accepts on the limits API.
pub const SERVICE_KEY: &str = "sk_test_0123456789abcdef";

/// A northstar server inside the test process, on a clock the test controls.
pub struct InProcess {
    pub server: Option<northstar::server::RunningServer>,
    /// Its HTTP API (the methods of [`Api`] are the server's, through `Deref`).
    pub api: Api,
    pub data: PathBuf,
    pub clock: northstar::clock::Clock,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for InProcess {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl InProcess {
    /// Starts the whole server in-process against `nats`, with `clock`.
    pub async fn start(nats: &Nats, config: &Value, clock: northstar::clock::Clock) -> Self {
        let shipped = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"));
        Self::start_with_pipelines(nats, config, clock, shipped).await
    }

    /// [`InProcess::start`] with the usage pipelines of `pipelines`.
    pub async fn start_with_pipelines(
        nats: &Nats,
        config: &Value,
        clock: northstar::clock::Clock,
        pipelines: PathBuf,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let config = Config::from_json(&config.to_string(), "test").expect("valid test config");
        let options = northstar::server::ServeOptions {
            config,
            data_dir: data.clone(),
            nats_url: Some(nats.url.clone()),
            admin_key: Some(ADMIN_KEY.into()),
            service_key: Some(SERVICE_KEY.into()),
            analyst_key: Some(ANALYST_KEY.into()),
            clock: clock.clone(),
            pipelines_dir: Some(pipelines),
            billing_secrets: northstar::billing::Secrets {
                secret_key: Some(STRIPE_SECRET_KEY.into()),
                webhook_secret: Some(STRIPE_WEBHOOK_SECRET.into()),
            },
        };
        let listener = northstar::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("a loopback port");
        let server = northstar::server::start(options, listener)
            .await
            .expect("server starts");
        let base = format!("http://{}", server.addr);
        Self {
            server: Some(server),
            api: Api::new(base),
            data,
            clock,
            _dir: dir,
        }
    }

    /// Stops it gracefully.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // A server not stopped by the test is dropped with its runtime; its embedded parts
        // (none here: NATS is the test's) need nothing more.
        let _ = self.server.take();
    }
}

/// The seed config plus a second, fractional meter: `storage_used` sums `properties.gb` into
/// feature `storage_gb` (free: 10, pro: 100 soft, hard cap 50 on free).
pub fn limits_config() -> Value {
    let mut config = test_config();
    config["serviceKeys"] = json!([SERVICE_KEY]);
    config["events"].as_array_mut().unwrap().push(json!({
        "name": "storage_used",
        "properties": ["gb"],
        "metering": {"featureId": "storage_gb", "aggregation": "sum", "unit": "GB", "valueProperty": "gb"}
    }));
    config["usageFeatures"].as_array_mut().unwrap().push(json!({
        "id": "storage_gb",
        "limits": {"free": 10, "pro": 100},
        "softLimits": ["pro"],
        "hardCaps": {"free": 50}
    }));
    config["usageFeatures"][0]["limits"] = json!({"free": 20, "pro": 50000, "enterprise": null});
    config["metering"] = json!({"snapshotInterval": "200ms", "pipelineInterval": "100ms", "upgradeUrl": "https://app.example/upgrade?c={customer_id}&f={feature}"});
    config
}

/// A local HTTP server that records the JSON bodies POSTed to it (a webhook receiver).
pub struct Recorder {
    pub base: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Recorder {
    /// Listens on a free loopback port and answers every request 200.
    pub async fn start() -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            async move {
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                                    store.lock().unwrap().push(value);
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { base, received }
    }

    /// Waits (up to 20 s) until `n` bodies arrived; returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.received.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} webhook calls arrived",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
