//! A full disk: ingest answers 503 `disk_full` with `Retry-After` while a disk northstar writes
//! to is below `storage.minFreeMb`, `/healthz` says `"disk": "full"`, and everything resumes by
//! itself when space returns; Parquet writes failing for space lose nothing and resume.
//!
//! Each test mounts a small tmpfs, so it needs root (CI runs as root); elsewhere it says it
//! skipped and passes.

mod harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Nats, Northstar, eventually, metric, test_config, tracks};
use serde_json::json;

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _parent: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `dir` (a fresh temp dir when `None`); `None` when this
    /// process may not mount (not root, or a container without the right).
    fn mount(dir: Option<&Path>, mib: u64) -> Option<Self> {
        let (parent, dir) = match dir {
            Some(dir) => (None, dir.to_path_buf()),
            None => {
                let parent = tempfile::tempdir().ok()?;
                let dir = parent.path().join("disk");
                (Some(parent), dir)
            }
        };
        std::fs::create_dir_all(&dir).ok()?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .ok()?;
        status.success().then_some(Self {
            dir,
            _parent: parent,
        })
    }

    fn grow(&self, mib: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.dir)
            .status()
            .expect("remount");
        assert!(status.success(), "growing the tmpfs");
    }

    fn free(&self) -> u64 {
        northstar::disk::available_bytes(&self.dir).expect("statvfs")
    }

    /// Writes a file of zeros until `leave` bytes are free (0: until the disk is full).
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while self.free() > leave {
            let room = usize::try_from(self.free() - leave).unwrap_or(usize::MAX);
            if file.write_all(&chunk[..room.min(chunk.len())]).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A test that cannot mount says so; under CI (`CI=true`) it fails instead, unless
/// `NORTHSTAR_SKIP_MOUNT` gives the reason (`.ci/run` sets it when its probe cannot mount), so a
/// skip is never mistaken for a pass.
fn skipped(test: &str) {
    let reason = std::env::var("NORTHSTAR_SKIP_MOUNT").unwrap_or_default();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci || !reason.trim().is_empty(),
        "{test}: cannot mount a tmpfs under CI; set NORTHSTAR_SKIP_MOUNT to the reason to skip"
    );
    eprintln!("{test}: SKIPPED: mounting a tmpfs needs root and the right to mount ({reason})");
}

/// Posts batches of 50 until one is refused; returns how many events were acked on the way
/// and the refusal.
async fn post_until_refused(
    server: &Northstar,
    prefix: &str,
    acked: &mut u64,
) -> northstar::client::ClientResponse {
    let mut round = 0;
    eventually(Duration::from_secs(30), async || {
        round += 1;
        let batch = tracks(&format!("{prefix}{round}"), 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        match answer.status {
            200 => {
                *acked += 50;
                Err("still accepted".to_string())
            }
            _ => Ok(answer),
        }
    })
    .await
}

async fn count_and_distinct(server: &Northstar) -> (i64, i64) {
    let rows = server
        .sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await;
    (
        rows[0]["n"].as_i64().unwrap_or(-1),
        rows[0]["d"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_sheds_ingest_and_resumes_when_the_disk_grows_losing_nothing() {
    let Some(disk) = Tmpfs::mount(None, 64) else {
        return skipped("a_full_disk_sheds_ingest");
    };
    let mut config = test_config();
    config["storage"] = json!({"minFreeMb": 16, "checkInterval": "100ms"});
    // The embedded nats-server, its store on the small disk too: the `make run` layout.
    let server = Northstar::start_in(&disk.dir.join("data"), None, &config);

    let mut acked: u64 = 0;
    for round in 0..4 {
        let batch = tracks(&format!("before{round}"), 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        acked += 50;
    }

    let filler = disk.fill(8 * 1024 * 1024);
    let refused = post_until_refused(&server, "filling", &mut acked).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["code"], "disk_full", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("storage.minFreeMb")),
        "says why and what bounds it: {body}"
    );
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["disk"], "full", "{}", health.text());
    let metrics = server.get("/metrics").await.text();
    assert_eq!(metric(&metrics, "northstar_disk_full "), Some(1));
    assert!(metric(&metrics, "northstar_ingest_disk_full_total ").is_some_and(|n| n >= 1));

    // More room on the same disk, no restart: ingest takes events again by itself.
    disk.grow(256);
    let mut round = 0;
    eventually(Duration::from_secs(30), async || {
        round += 1;
        let batch = tracks(&format!("after{round}"), 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        match answer.status {
            200 => {
                acked += 50;
                Ok(())
            }
            other => Err(format!("{other} {}", answer.text())),
        }
    })
    .await;
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["disk"], "ok");

    server.wait_archived(acked).await;
    assert_eq!(
        count_and_distinct(&server).await,
        (acked as i64, acked as i64),
        "every acked event once"
    );
    drop(server);
    let _ = std::fs::remove_file(filler);
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_writes_failing_for_space_lose_nothing_and_resume_when_space_returns() {
    let parent = tempfile::tempdir().expect("temp dir");
    let data = parent.path().join("data");
    // Only the Parquet tables of `events` are on the small disk; JetStream keeps taking events.
    let Some(disk) = Tmpfs::mount(Some(&data.join("events")), 16) else {
        return skipped("parquet_writes_failing_for_space");
    };
    let nats = Nats::start();
    let mut config = test_config();
    // No reserve: the archiver meets the full disk itself.
    config["storage"] = json!({"minFreeMb": 0});
    let server = Northstar::start_in(&data, Some(nats.url.clone()), &config);

    let post = async |prefix: &str| {
        let answer = server
            .post("/v1/batch", &json!({"batch": tracks(prefix, 0..100)}))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    };
    post("before").await;
    server.wait_archived(100).await;

    let filler = disk.fill(0);
    for round in 0..3 {
        post(&format!("while-full{round}")).await;
    }
    eventually(Duration::from_secs(30), async || {
        let metrics = server.get("/metrics").await.text();
        match metric(
            &metrics,
            "northstar_archive_failures_total{table=\"events\"} ",
        ) {
            Some(n) if n > 0 => Ok(()),
            other => Err(format!("archive failures: {other:?}")),
        }
    })
    .await;
    let manifest = northstar::archive::ArchiveManifest::load(&data.join("events")).unwrap();
    assert_eq!(
        manifest.rows, 100,
        "nothing half-committed while the disk is full"
    );

    std::fs::remove_file(filler).expect("free the disk");
    server.wait_archived(400).await;
    assert_eq!(count_and_distinct(&server).await, (400, 400));
    assert_eq!(
        harness::leftovers(&data.join("events")),
        Vec::<PathBuf>::new(),
        "no temp file of a failed commit stays behind"
    );
}

/// nats-server meets a real ENOSPC (the disk filled by someone else, and no reserve:
/// `storage.minFreeMb` 0): it turns JetStream off and would not turn it on again. `/healthz`
/// says so, and when space returns the embedded server is restarted on the same store and
/// port: ingest takes events again with no restart of northstar, and every acked event lands
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn jetstream_stopped_by_a_full_disk_comes_back_when_space_returns() {
    let Some(disk) = Tmpfs::mount(None, 64) else {
        return skipped("jetstream_stopped_by_a_full_disk");
    };
    let mut config = test_config();
    config["storage"] = json!({"minFreeMb": 0, "checkInterval": "200ms"});
    let server = Northstar::start_in(&disk.dir.join("data"), None, &config);
    // Batches answered 200; a batch refused may have been stored in part (its client retries
    // it with the same ids), so only these are counted.
    let mut acked: Vec<String> = Vec::new();
    let post = async |prefix: String| {
        let batch = tracks(&prefix, 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        (prefix, answer)
    };
    for round in 0..4 {
        let (prefix, answer) = post(format!("before{round}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        acked.push(prefix);
    }

    let filler = disk.fill(0);
    let mut round = 0;
    let refused = eventually(Duration::from_secs(60), async || {
        round += 1;
        let (prefix, answer) = post(format!("filling{round}")).await;
        match answer.status {
            200 => {
                acked.push(prefix);
                Err("still accepted".to_string())
            }
            _ => Ok(answer),
        }
    })
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let health = eventually(Duration::from_secs(90), async || {
        let health = server.get("/healthz").await;
        match (health.status, health.json()["jetstream"].as_str()) {
            (503, Some("unavailable")) => Ok(health.json()),
            _ => Err(health.text()),
        }
    })
    .await;
    assert_eq!(
        health["nats"], "connected",
        "the connection alone looks fine: {health}"
    );
    // Ingest says so at once rather than waiting for each publish to time out.
    let (_, refused) = post("while-down".to_string()).await;
    assert_eq!(refused.status, 503);
    assert!(
        refused.text().contains("JetStream does not answer"),
        "{}",
        refused.text()
    );
    assert!(refused.headers.get("retry-after").is_some());

    std::fs::remove_file(&filler).expect("remove the filler");
    let mut round = 0;
    eventually(Duration::from_secs(90), async || {
        round += 1;
        let (prefix, answer) = post(format!("after{round}")).await;
        match answer.status {
            200 => {
                acked.push(prefix);
                Ok(())
            }
            other => Err(format!("{other} {}", answer.text())),
        }
    })
    .await;
    let health = eventually(Duration::from_secs(30), async || {
        let health = server.get("/healthz").await;
        match health.status {
            200 => Ok(health.json()),
            _ => Err(health.text()),
        }
    })
    .await;
    assert!(
        health["nats_restarts"].as_u64().is_some_and(|n| n >= 1),
        "the embedded server was restarted: {health}"
    );
    server.wait_archived(50 * acked.len() as u64).await;
    let (n, distinct) = count_and_distinct(&server).await;
    assert_eq!(n, distinct, "no event twice");
    for prefix in &acked {
        let sql = format!("SELECT count(*) AS n FROM events WHERE event_id LIKE '{prefix}-%'");
        assert_eq!(
            server.sql(&sql).await[0]["n"],
            50,
            "every acked event of {prefix}"
        );
    }
}
