//! Shared helpers for the integration tests: spawn the real `wharf` binary on
//! port 0 with a temporary data directory, and a small HTTP client.
#![allow(dead_code)]

pub mod cache;
pub mod containerd;
pub mod distribution;
pub mod fake_upstream;
pub mod http;
pub mod images;
pub mod replication;
pub mod seaweedfs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `wharf serve` process. Killed (SIGKILL) on drop.
pub struct Wharf {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Wharf {
    /// `127.0.0.1:PORT`, suitable for `docker://127.0.0.1:PORT/...` references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for wharf")
    }
    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Wharf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wharf_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wharf")
}

/// Spawns `wharf serve` on 127.0.0.1:0 with a fresh data directory.
/// `extra_toml` is appended to the generated config file (it may add sections
/// other than `[server]` and `[storage]`, or keys via `server_extra`).
pub fn spawn_wharf(extra_toml: &str) -> Wharf {
    let dir = tempfile::tempdir().expect("tempdir");
    spawn_wharf_in(dir, "", extra_toml)
}

/// Like [`spawn_wharf`], with extra keys inside `[server]`.
pub fn spawn_wharf_with(server_extra: &str, extra_toml: &str) -> Wharf {
    let dir = tempfile::tempdir().expect("tempdir");
    spawn_wharf_in(dir, server_extra, extra_toml)
}

/// Spawns wharf over an existing directory (restart after a crash).
pub fn spawn_wharf_in(dir: tempfile::TempDir, server_extra: &str, extra_toml: &str) -> Wharf {
    spawn_config_in(dir, "", "127.0.0.1:0", server_extra, extra_toml)
}

/// Writes `wharf.toml` in `dir` (`head`, then `[server]` on `listen` with
/// `server_extra`, filesystem storage in `dir/data`, then `extra_toml`)
/// and spawns wharf with it.
pub fn spawn_config_in(
    dir: tempfile::TempDir,
    head: &str,
    listen: &str,
    server_extra: &str,
    extra_toml: &str,
) -> Wharf {
    let config = dir.path().join("wharf.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "{head}\n[server]\nlisten = \"{listen}\"\n{server_extra}\n\n[storage]\ntype = \"filesystem\"\npath = {:?}\n\n{extra_toml}\n",
            data.display().to_string()
        ),
    )
    .expect("write config");
    let (child, addr) = start(&config, &[]);
    Wharf {
        child,
        addr,
        dir,
        config,
    }
}

/// `wharf` with no `WHARF_*` override from the test's own environment
/// (`WHARF_LOG` excepted, default `warn`).
pub fn wharf_cmd() -> Command {
    let mut cmd = Command::new(wharf_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("WHARF_") && k != "WHARF_LOG" {
            cmd.env_remove(k);
        }
    }
    if std::env::var_os("WHARF_LOG").is_none() {
        cmd.env("WHARF_LOG", "warn");
    }
    cmd
}

/// Spawns wharf with the configuration `body` verbatim (it brings its own
/// `[server]` and `[storage]`), in `dir`, with extra environment variables
/// and without the inherited ones named in `env_remove`.
pub fn spawn_wharf_config(
    dir: tempfile::TempDir,
    body: &str,
    env: &[(&str, &str)],
    env_remove: &[&str],
) -> Wharf {
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, body).expect("write config");
    let (child, addr) = start_with(&config, env, env_remove);
    Wharf {
        child,
        addr,
        dir,
        config,
    }
}

/// Starts `wharf serve --config CONFIG` and waits for its `listening on ADDR`
/// line on stdout.
pub fn start(config: &Path, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    start_with(config, env, &[])
}

/// Like [`start`], without the inherited variables named in `env_remove`.
pub fn start_with(config: &Path, env: &[(&str, &str)], env_remove: &[&str]) -> (Child, SocketAddr) {
    let (child, url) = start_url_with(config, env, env_remove);
    let addr = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap_or_else(|e| panic!("address in {url:?}: {e}"));
    (child, addr)
}

/// Like [`start`], returning the URL as printed (`http://ADDR` or
/// `https://ADDR`).
pub fn start_url(config: &Path, env: &[(&str, &str)]) -> (Child, String) {
    start_url_with(config, env, &[])
}

fn start_url_with(config: &Path, env: &[(&str, &str)], env_remove: &[&str]) -> (Child, String) {
    let mut cmd = wharf_cmd();
    for k in env_remove {
        cmd.env_remove(k);
    }
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn wharf");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => (child, url),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().expect("wait for wharf");
            panic!("wharf exited before listening ({status}); its stderr is above");
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            panic!("wharf did not report its listening address within 60 s");
        }
    }
}

/// Waits, without blocking the runtime, for `child` to exit; fails the test
/// after `limit`.
pub async fn exited_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wharf did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns the path of a required external tool, panicking with a clear
/// message when it is missing (CI installs every tool; a missing one is a
/// failure, never a skip).
pub fn require_tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "required tool `{name}` is not installed; run scripts/test (or .ci/run) to install it"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// sha256 of bytes as `sha256:<hex>`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
