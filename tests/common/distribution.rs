//! CNCF Distribution (`docker-registry serve`) as a real upstream: started
//! on a free loopback port with its own storage in a temporary directory,
//! seeded with `skopeo copy`, and read back through its access log, which
//! names every request it answered (method, path, status, user agent).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::{OCI_INDEX, OciImage, run, unique};
use super::require_tool;

/// The user agent of the readiness probe; its requests are left out of
/// [`Distribution::access_log`].
const PROBE_AGENT: &str = "wharf-tests-readiness-probe";

/// A running Distribution registry. Killed on drop.
pub struct Distribution {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// One line of Distribution's access log (Apache combined format on stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    /// Path and query, as requested.
    pub path: String,
    pub status: u16,
    pub user_agent: String,
}

impl Distribution {
    /// Starts `docker-registry serve` on `127.0.0.1:<free port>` and waits
    /// until it answers `GET /v2/` with 200.
    pub fn start() -> Self {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        // A port picked by binding port 0 may be taken again before the
        // registry binds it; then it exits and we try another.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::try_start(&dir, port) {
                Ok(child) => {
                    return Distribution {
                        child: Some(child),
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        dir,
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("Distribution did not start:\n{last_err}");
    }

    fn try_start(dir: &tempfile::TempDir, port: u16) -> Result<Child, String> {
        let d = dir.path();
        let config = d.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {:?}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: wharf-mirror-tests\n",
                d.join("data").display().to_string()
            ),
        )
        .expect("write Distribution config");
        let stdout = std::fs::File::create(d.join("access.log")).expect("access log");
        let stderr = std::fs::File::create(d.join("registry.log")).expect("registry log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            // Its S3 driver panics on this; harmless here, but keep it out.
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start docker-registry");
        let listening = format!("listening on 127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(d.join("registry.log")).unwrap_or_default();
            if let Some(status) = child.try_wait().expect("wait") {
                return Err(format!("docker-registry exited ({status}):\n{log}"));
            }
            if log.contains(&listening) && get_v2(port) {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "docker-registry did not answer /v2/ in 30 s:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the registry and waits for it; it answers nothing afterwards
    /// (the port refuses connections). The logs stay readable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pushes `image` (an image or a whole index) unchanged to
    /// `REPO:TAG` here with `skopeo copy --preserve-digests` and returns the
    /// digest of the manifest (or index), checked to be the image's own.
    pub fn seed(&self, image: &OciImage, repo: &str, tag: &str) -> String {
        require_tool("skopeo");
        let digestfile = image.layout.with_file_name(unique("seed-digest"));
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            "--digestfile",
        ])
        .arg(&digestfile);
        if image.media_type == OCI_INDEX {
            cmd.arg("--all");
        }
        run(cmd
            .arg(image.reference())
            .arg(format!("docker://{}/{repo}:{tag}", self.host())));
        let digest = std::fs::read_to_string(&digestfile)
            .expect("skopeo wrote no digest file")
            .trim()
            .to_string();
        assert_eq!(digest, image.digest, "Distribution stored another digest");
        digest
    }

    /// The access log: every request answered so far, in order, except
    /// the readiness probe's `GET /v2/` at start. Waits
    /// until the log has not grown for 300 ms, as a line is written just
    /// after its response is sent.
    pub fn access_log(&self) -> Vec<Access> {
        let path = self.access_log_path();
        let mut last = String::new();
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(300)
                || Instant::now() > deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last.lines()
            .map(|l| parse_access(l).unwrap_or_else(|| panic!("unparsable access line: {l}")))
            .filter(|a| a.user_agent != PROBE_AGENT)
            .collect()
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// The registry's own log (stderr): errors with their details.
    pub fn registry_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses `IP - - [DATE] "METHOD PATH PROTO" STATUS SIZE "REFERER" "UA"`.
fn parse_access(line: &str) -> Option<Access> {
    let mut quoted = line.split('"');
    let _ = quoted.next()?;
    let request = quoted.next()?;
    let status_size = quoted.next()?;
    let _referer = quoted.next()?;
    let _ = quoted.next()?;
    let user_agent = quoted.next()?.to_string();
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let status = status_size.split_whitespace().next()?.parse().ok()?;
    Some(Access {
        method,
        path,
        status,
        user_agent,
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `GET /v2/` answered 200.
fn get_v2(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: {PROBE_AGENT}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200")
}
