//! The embedded default: a real `nats-server` child process with its store under the data dir.
//!
//! The server listens on a free loopback port that it picks itself (`-p -1`) and reports
//! through a ports file, so there is no race between choosing a port and binding it. The child
//! gets `SIGTERM` when northstar exits, even by `kill -9` (Linux parent-death signal), and a
//! server left over from an earlier crash is stopped through its pid file before a new one
//! starts on the same store.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::BusError;

/// A running embedded nats-server.
pub struct EmbeddedNats {
    child: Child,
    url: String,
    store: PathBuf,
    binary: PathBuf,
    /// The port it listens on: a restart binds the same one, so clients reconnect by themselves.
    port: String,
    /// Times it was restarted because JetStream stopped answering.
    restarts: u64,
}

impl EmbeddedNats {
    /// Starts nats-server with JetStream, its store in `store_dir`, its file store limited to
    /// `max_file_store` bytes (`None`: the server's own default, for benchmarks).
    pub async fn start(store_dir: &Path, max_file_store: Option<i64>) -> Result<Self, BusError> {
        let binary = find_nats_server().ok_or_else(|| {
            BusError::Spawn(
                "nats-server not found on PATH, in /usr/sbin or in $NORTHSTAR_NATS_SERVER; \
                 install it (`apt-get install nats-server`, or `make run` does it) or pass --nats-url"
                    .into(),
            )
        })?;
        std::fs::create_dir_all(store_dir)
            .map_err(|e| BusError::Spawn(format!("cannot create {}: {e}", store_dir.display())))?;
        let pid_file = store_dir.join("nats-server.pid");
        stop_leftover_server(&pid_file).await;
        let config_file = store_dir.join("nats-server.conf");
        std::fs::write(&config_file, server_config(store_dir, max_file_store))
            .map_err(|e| BusError::Spawn(format!("cannot write {}: {e}", config_file.display())))?;

        let (child, url) = spawn(&binary, store_dir, "-1").await?;
        tracing::info!(%url, store = %store_dir.display(), max_file_store, "embedded nats-server started");
        let port = url.rsplit(':').next().unwrap_or("-1").to_string();
        Ok(Self {
            child,
            url,
            store: store_dir.to_path_buf(),
            binary,
            port,
            restarts: 0,
        })
    }

    /// Stops the server and starts it again on the same store and port. nats-server turns
    /// JetStream off when a store write fails for space and does not turn it on again by
    /// itself; a new process recovers the store and serves it.
    pub async fn restart(&mut self) -> Result<(), BusError> {
        self.stop_child().await;
        let (child, url) = spawn(&self.binary, &self.store, &self.port).await?;
        self.child = child;
        self.restarts += 1;
        tracing::warn!(%url, restarts = self.restarts, "embedded nats-server restarted");
        Ok(())
    }

    /// Times the server was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    async fn stop_child(&mut self) {
        if let Some(pid) = self.child.id() {
            signal(pid, libc::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }

    /// The client URL (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server cleanly (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop(&mut self) {
        self.stop_child().await;
        let _ = std::fs::remove_file(self.store.join("nats-server.pid"));
        tracing::info!("embedded nats-server stopped");
    }
}

/// Starts nats-server on `store_dir` (its config file written there) listening on `port`
/// (`-1`: a free one it picks), and returns it with its client URL.
async fn spawn(binary: &Path, store_dir: &Path, port: &str) -> Result<(Child, String), BusError> {
    let ports_dir = store_dir.join("ports");
    let _ = std::fs::remove_dir_all(&ports_dir);
    std::fs::create_dir_all(&ports_dir)
        .map_err(|e| BusError::Spawn(format!("cannot create {}: {e}", ports_dir.display())))?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(store_dir.join("nats-server.conf"))
        .args([
            "--addr",
            "127.0.0.1",
            "--port",
            port,
            "--server_name",
            "northstar-embedded",
        ])
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .arg("--pid")
        .arg(store_dir.join("nats-server.pid"))
        .arg("--log")
        .arg(store_dir.join("nats-server.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    die_with_parent(&mut command);
    let child = command
        .spawn()
        .map_err(|e| BusError::Spawn(format!("{}: {e}", binary.display())))?;
    let pid = child.id().unwrap_or_default();
    let url = wait_for_ports_file(&ports_dir, pid, Duration::from_secs(15)).await?;
    Ok((child, url))
}

/// The server's config file: JetStream with its store and explicit limits. The rest (address,
/// port, logs) is given as flags.
fn server_config(store_dir: &Path, max_file_store: Option<i64>) -> String {
    let store = serde_json::to_string(&store_dir.display().to_string()).unwrap_or_default();
    let mut text = format!(
        "# written by northstar at every start of its embedded server\njetstream {{\n  store_dir: {store}\n  max_memory_store: {MAX_MEMORY_STORE}\n"
    );
    if let Some(bytes) = max_file_store {
        text.push_str(&format!("  max_file_store: {bytes}\n"));
    }
    text.push_str("}\n");
    text
}

/// JetStream memory store limit: northstar keeps nothing in memory streams.
const MAX_MEMORY_STORE: u64 = 64 * 1024 * 1024;

/// Where the nats-server binary is: `$NORTHSTAR_NATS_SERVER`, then `PATH`, then Debian's /usr/sbin.
pub fn find_nats_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NORTHSTAR_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own process state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we own; errors (already gone) are fine to ignore.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Stops a nats-server that an earlier northstar left running on this store (a crash on a
/// system without parent-death signals, or a server started by hand).
async fn stop_leftover_server(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("nats-server") {
        return;
    }
    tracing::warn!(pid, "stopping a nats-server left over on this store");
    signal(pid, libc::SIGTERM);
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(pid, libc::SIGKILL);
}

/// Reads the client URL from the ports file (`<binary>_<pid>.ports`, `{"nats": ["nats://…"]}`).
async fn wait_for_ports_file(dir: &Path, pid: u32, wait: Duration) -> Result<String, BusError> {
    let suffix = format!("_{pid}.ports");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let file = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.to_string_lossy().ends_with(&suffix));
        if let Some(file) = file
            && let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(url) = ports["nats"][0].as_str()
        {
            return Ok(url.to_string());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BusError::Spawn(format!(
                "nats-server did not report its port within {wait:?}; see its log next to the store"
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
