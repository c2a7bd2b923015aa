//! The three servers under comparison, each a private process on a loopback
//! port with its own directory: wharf (release build), CNCF Distribution
//! (`docker-registry`) and nginx serving the same files with sendfile.
//! Also the `/proc` readings: resident memory, its peak, and CPU time.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Wharf,
    Distribution,
    Nginx,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Wharf, Kind::Distribution, Kind::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Wharf => "wharf",
            Kind::Distribution => "Distribution",
            Kind::Nginx => "nginx",
        }
    }
    fn dir_name(self) -> &'static str {
        match self {
            Kind::Wharf => "wharf",
            Kind::Distribution => "distribution",
            Kind::Nginx => "nginx",
        }
    }
    /// Is it a registry (accepts pushes through the distribution API)?
    pub fn is_registry(self) -> bool {
        !matches!(self, Kind::Nginx)
    }
}

/// Finds a program on PATH, or in the sbin folders a non-root PATH may lack.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A free loopback port (bound, read and released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// The server's private folder: config, logs and data.
    pub dir: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// The repository prefix of wharf's pull-through rule when it runs as a
/// cache (`/v2/<prefix>/<repo>/...` is served from `<upstream>/v2/<repo>/...`).
pub const PULL_THROUGH_PREFIX: &str = "up";

/// How a server is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Serve as a pull-through cache of this registry (`http://host:port`):
    /// wharf gets one `[[pull_through]]` rule with prefix
    /// [`PULL_THROUGH_PREFIX`], Distribution runs in proxy mode. Registries
    /// only.
    pub upstream: Option<String>,
    /// Distribution writes its access log (into `stdout.log`), so that the
    /// requests it served can be counted afterwards.
    pub access_log: bool,
}

impl Server {
    /// Writes the configuration for `kind` under `work/<kind>` (nothing is
    /// started yet).
    pub fn configure(kind: Kind, work: &Path, wharf_bin: &Path) -> anyhow::Result<Server> {
        Server::configure_with(
            kind,
            work.join(kind.dir_name()),
            wharf_bin,
            &Setup::default(),
        )
    }

    /// Writes the configuration for `kind`, set up as `setup` says, in
    /// `dir` (nothing is started yet).
    pub fn configure_with(
        kind: Kind,
        dir: PathBuf,
        wharf_bin: &Path,
        setup: &Setup,
    ) -> anyhow::Result<Server> {
        anyhow::ensure!(
            kind.is_registry() || setup.upstream.is_none(),
            "{} cannot be a pull-through cache",
            kind.name()
        );
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let (program, args) = match kind {
            Kind::Wharf => {
                let config = dir.join("wharf.toml");
                let mut text = format!(
                    "[server]\nlisten = \"{addr}\"\nshutdown_timeout = \"2s\"\n\n\
                     [storage]\npath = \"{}\"\n",
                    dir.join("data").display()
                );
                if let Some(up) = &setup.upstream {
                    text.push_str(&format!(
                        "\n[[pull_through]]\nprefix = \"{PULL_THROUGH_PREFIX}\"\nupstream = \"{up}\"\n"
                    ));
                }
                fs::write(&config, text)?;
                (
                    wharf_bin.to_path_buf(),
                    vec![
                        "serve".into(),
                        "--config".into(),
                        config.display().to_string(),
                    ],
                )
            }
            Kind::Distribution => {
                let config = dir.join("config.yml");
                // Access log off and level error, as wharf runs at WHARF_LOG=warn;
                // the in-memory blob descriptor cache is Distribution's
                // recommended (and Debian's default) setting.
                let mut text = format!(
                    "version: 0.1\n\
                     log:\n  level: error\n  accesslog:\n    disabled: {}\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\n  \
                     cache:\n    blobdescriptor: inmemory\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: {addr}\n",
                    !setup.access_log,
                    dir.join("data").display()
                );
                if let Some(up) = &setup.upstream {
                    text.push_str(&format!("proxy:\n  remoteurl: {up}\n"));
                }
                fs::write(&config, text)?;
                let program = find_program("docker-registry")
                    .ok_or_else(|| anyhow::anyhow!("docker-registry is not installed"))?;
                (program, vec!["serve".into(), config.display().to_string()])
            }
            Kind::Nginx => {
                let root = dir.join("root");
                fs::create_dir_all(root.join("v2"))?;
                fs::create_dir_all(dir.join("temp"))?;
                let d = dir.display();
                // Running as root, workers would drop to `nobody` and could
                // not read the private (0700) folder.
                let user = if is_root() { "user root;\n" } else { "" };
                fs::write(
                    dir.join("nginx.conf"),
                    format!(
                        "{user}daemon off;\nmaster_process on;\nworker_processes auto;\n\
                         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                         events {{ worker_connections 4096; }}\n\
                         http {{\n\
                         \x20 access_log off;\n\
                         \x20 sendfile on;\n\
                         \x20 tcp_nopush on;\n\
                         \x20 keepalive_requests 100000000;\n\
                         \x20 types {{ }}\n\
                         \x20 default_type application/octet-stream;\n\
                         \x20 client_body_temp_path {d}/temp/body;\n\
                         \x20 proxy_temp_path {d}/temp/proxy;\n\
                         \x20 fastcgi_temp_path {d}/temp/fastcgi;\n\
                         \x20 uwsgi_temp_path {d}/temp/uwsgi;\n\
                         \x20 scgi_temp_path {d}/temp/scgi;\n\
                         \x20 server {{\n\
                         \x20   listen {addr};\n\
                         \x20   root {root};\n\
                         \x20   location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}\n\
                         \x20   location ~ ^/v2/.+/manifests/ {{ default_type application/vnd.oci.image.manifest.v1+json; }}\n\
                         \x20 }}\n\
                         }}\n",
                        root = root.display(),
                    ),
                )?;
                let program = find_program("nginx")
                    .ok_or_else(|| anyhow::anyhow!("nginx is not installed"))?;
                (
                    program,
                    vec![
                        "-p".into(),
                        format!("{d}"),
                        "-c".into(),
                        format!("{d}/nginx.conf"),
                        "-e".into(),
                        format!("{d}/error.log"),
                    ],
                )
            }
        };
        Ok(Server {
            kind,
            addr,
            dir,
            program,
            args,
            child: None,
        })
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// nginx's document root.
    pub fn nginx_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where the server keeps the bytes of a blob (to remove a pushed blob
    /// between repetitions, off the clock).
    pub fn blob_file(&self, hex: &str) -> Option<PathBuf> {
        let data = self.dir.join("data");
        match self.kind {
            Kind::Wharf => Some(data.join("blobs/sha256").join(&hex[..2]).join(hex)),
            Kind::Distribution => Some(
                data.join("docker/registry/v2/blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data"),
            ),
            Kind::Nginx => None,
        }
    }

    /// Deletes the server's data folder (it must be stopped), so that the
    /// next start begins with empty storage.
    pub fn wipe_data(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "{} must be stopped before its data is wiped",
            self.name()
        );
        let data = self.dir.join("data");
        match fs::remove_dir_all(&data) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::anyhow!("removing {}: {e}", data.display())),
        }
    }

    /// How many `method` requests for exactly `path` (query ignored) the
    /// server has answered, from its access log (Distribution started with
    /// [`Setup::access_log`]; 0 otherwise).
    pub fn served(&self, method: &str, path: &str) -> u64 {
        fs::read_to_string(self.dir.join("stdout.log"))
            .map(|log| count_requests(&log, method, path))
            .unwrap_or(0)
    }

    /// Spawns the server and waits until `GET /v2/` answers 200. Returns the
    /// time from spawn to that first 200 (start-to-ready).
    pub fn start(&mut self) -> anyhow::Result<Duration> {
        anyhow::ensure!(self.child.is_none(), "{} is already running", self.name());
        let stdout = fs::File::create(self.dir.join("stdout.log"))?;
        let stderr = fs::File::create(self.dir.join("stderr.log"))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // Only the configuration written above applies: no stray overrides.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("WHARF_") || k.starts_with("REGISTRY_") {
                cmd.env_remove(&*k);
            }
        }
        if self.kind == Kind::Wharf {
            cmd.env("WHARF_LOG", "warn");
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.program.display()))?;
        self.child = Some(child);
        let deadline = started + Duration::from_secs(30);
        loop {
            if http::request(self.addr, "GET", "/v2/", &[], http::Body::None)
                .is_ok_and(|r| r.status() == 200)
            {
                return Ok(started.elapsed());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                anyhow::bail!(
                    "{} exited at start ({status}); its log:\n{}",
                    self.name(),
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                self.stop();
                anyhow::bail!(
                    "{} did not answer GET /v2/ within 30 s; its log:\n{}",
                    self.name(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["stderr.log", "stdout.log", "error.log"] {
            if let Ok(s) = fs::read_to_string(self.dir.join(f)) {
                let lines: Vec<&str> = s.lines().collect();
                for l in &lines[lines.len().saturating_sub(20)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// The server's processes: the one spawned and its children (nginx's
    /// workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let main = child.id();
        let mut pids = vec![main];
        if let Ok(entries) = fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid != main && status_field(pid, "PPid:") == Some(main as u64) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Resident memory now, summed over the server's processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&p| status_field(p, "VmRSS:"))
            .sum()
    }

    /// Resets the peak-RSS counters (`/proc/PID/clear_refs`, Linux ≥ 4.0).
    /// Returns false if that was not allowed.
    pub fn reset_peak(&self) -> bool {
        self.pids()
            .iter()
            .all(|p| fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok())
    }

    /// Peak resident memory since the last reset, summed over the server's
    /// processes (an upper bound for several processes), in KiB.
    pub fn peak_kib(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&p| status_field(p, "VmHWM:"))
            .sum()
    }

    /// User + system CPU time used so far by the server's processes.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().iter().map(|&p| cpu_seconds(p)).sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counts the lines of a combined-format access log (Distribution's) for
/// `method` on `path`: `... "GET /v2/a/blobs/sha256:... HTTP/1.1" 200 ...`.
pub fn count_requests(log: &str, method: &str, path: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split('"').nth(1))
        .filter(|req| {
            let mut parts = req.split(' ');
            parts.next() == Some(method)
                && parts
                    .next()
                    .is_some_and(|target| target.split('?').next() == Some(path))
        })
        .count() as u64
}

/// A numeric field (first number) of `/proc/PID/status`.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// Checks run by `cargo test`.
pub fn self_check() {
    let log = "127.0.0.1 - - [01/Dec/2026:05:45:38 +0000] \"HEAD /v2/a/blobs/sha256:ab HTTP/1.1\" 200 0 \"\" \"Go\"\n\
               127.0.0.1 - - [01/Dec/2026:05:45:38 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"Go\"\n\
               127.0.0.1 - - [01/Dec/2026:05:45:38 +0000] \"GET /v2/a/blobs/sha256:ab HTTP/1.1\" 200 5 \"\" \"Go\"\n\
               127.0.0.1 - - [01/Dec/2026:05:45:38 +0000] \"GET /v2/a/blobs/sha256:ab?x=1 HTTP/1.1\" 206 5 \"\" \"Go\"\n\
               127.0.0.1 - - [01/Dec/2026:05:45:38 +0000] \"GET /v2/a/blobs/sha256:abc HTTP/1.1\" 200 5 \"\" \"Go\"\n\
               garbage\n";
    assert_eq!(count_requests(log, "GET", "/v2/a/blobs/sha256:ab"), 2);
    assert_eq!(count_requests(log, "HEAD", "/v2/a/blobs/sha256:ab"), 1);
    assert_eq!(count_requests(log, "GET", "/v2/"), 1);
    assert_eq!(count_requests("", "GET", "/v2/"), 0);
}
