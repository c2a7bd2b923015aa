//! A real SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in
//! one process) on loopback, on free ports, with a fresh data directory and
//! the bucket `wharf`. Killed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use wharf::storage::s3::{S3Options, connect};

pub const BUCKET: &str = "wharf";
pub const ACCESS_KEY: &str = "wharf-test";
pub const SECRET_KEY: &str = "wharf-test-secret";

pub struct SeaweedFs {
    child: Child,
    pub dir: tempfile::TempDir,
    pub s3_port: u16,
    /// The HTTPS port of the S3 gateway, when started with TLS.
    pub https_port: Option<u16>,
}

/// `n` distinct free ports on 127.0.0.1 (bound, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

impl SeaweedFs {
    /// Starts SeaweedFS and waits until its S3 gateway accepts a write into
    /// the bucket.
    pub async fn start() -> SeaweedFs {
        Self::start_with_tls(None).await
    }

    /// [`SeaweedFs::start`] for tests without a runtime.
    pub fn start_blocking() -> SeaweedFs {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(Self::start())
    }

    /// Like [`SeaweedFs::start`]; with `(cert.pem, key.pem)` the S3 gateway
    /// also answers HTTPS on [`SeaweedFs::https_endpoint`].
    pub async fn start_with_tls(tls: Option<(&std::path::Path, &std::path::Path)>) -> SeaweedFs {
        // The free ports are picked before weed binds them: another process
        // may take one in between. Then start again on other ports.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(tls).await {
                Ok(sw) => return sw,
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "SeaweedFS did not start in 3 attempts:\n{}",
            failures.join("\n----\n")
        );
    }

    async fn try_start(
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<SeaweedFs, String> {
        let weed = super::require_tool("weed");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"wharf","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("s3.json");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let p = free_ports(11);
        let log = std::fs::File::create(dir.path().join("weed.log")).expect("log");
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-volume.preStopSeconds=0",
            ])
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args(match tls {
                Some((cert, key)) => vec![
                    format!("-s3.cert.file={}", cert.display()),
                    format!("-s3.key.file={}", key.display()),
                    format!("-s3.port.https={}", p[10]),
                ],
                None => vec![],
            })
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn weed mini");
        let mut sw = SeaweedFs {
            child,
            dir,
            s3_port: p[6],
            https_port: tls.map(|_| p[10]),
        };
        let store = sw.object_store();
        let probe = object_store::path::Path::from("ready-probe");
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            if let Ok(Some(status)) = sw.child.try_wait() {
                return Err(format!(
                    "weed mini exited ({status}) before it was ready; its log:\n{}",
                    sw.log()
                ));
            }
            if store.put(&probe, PutPayload::from("ok")).await.is_ok() {
                let _ = store.delete(&probe).await;
                return Ok(sw);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "SeaweedFS S3 did not accept a write within 45 s; its log:\n{}",
                    sw.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log(&self) -> String {
        let bytes = std::fs::read(self.dir.path().join("weed.log")).unwrap_or_default();
        let start = bytes.len().saturating_sub(4000);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `https://127.0.0.1:PORT` (started with TLS only).
    pub fn https_endpoint(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https_port.expect("started with TLS")
        )
    }

    pub fn options(&self, prefix: &str) -> S3Options {
        S3Options {
            bucket: BUCKET.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".to_string(),
            path_style: true,
            credentials: Some((ACCESS_KEY.to_string(), SECRET_KEY.to_string())),
            ca_pem: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }

    /// A client of the bucket.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        connect(&self.options("")).expect("object_store client")
    }

    /// A `[storage]` section for wharf over this bucket under `prefix`,
    /// with local scratch space in `scratch`. The secret comes from the
    /// environment variable `S3_TEST_SECRET` (set it when spawning).
    pub fn storage_toml(&self, prefix: &str, scratch: &std::path::Path) -> String {
        format!(
            "[storage]\ntype = \"s3\"\npath = {scratch:?}\n\n[storage.s3]\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\npath_style = true\ncredentials = {{ access_key_id = \"{ACCESS_KEY}\", secret_access_key_env = \"S3_TEST_SECRET\" }}\n",
            self.endpoint(),
            scratch = scratch.display().to_string(),
        )
    }
}

impl SeaweedFs {
    /// A whole wharf configuration over this bucket under `prefix`, with
    /// its scratch space in `dir`, no pull-through rules, and `s3_extra`
    /// appended inside `[storage.s3]`.
    pub fn wharf_config(&self, prefix: &str, dir: &std::path::Path, s3_extra: &str) -> String {
        format!(
            "pull_through = []\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n{}{s3_extra}\n",
            self.storage_toml(prefix, &dir.join("scratch"))
        )
    }

    /// Spawns a wharf replica over this bucket under `prefix` (see
    /// [`SeaweedFs::wharf_config`]), with extra environment variables and
    /// without the inherited ones named in `env_remove`.
    pub fn spawn_wharf(
        &self,
        prefix: &str,
        s3_extra: &str,
        env: &[(&str, &str)],
        env_remove: &[&str],
    ) -> super::Wharf {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = self.wharf_config(prefix, dir.path(), s3_extra);
        let mut env = env.to_vec();
        env.push(("S3_TEST_SECRET", SECRET_KEY));
        super::spawn_wharf_config(dir, &body, &env, env_remove)
    }
}

impl SeaweedFs {
    /// Spawns a wharf replica over this bucket under `prefix` with the
    /// pull-through rules `rules_toml`.
    pub fn spawn_pull_through(&self, prefix: &str, rules_toml: &str) -> super::Wharf {
        self.spawn_pull_through_with(prefix, rules_toml, &[])
    }

    /// [`SeaweedFs::spawn_pull_through`] with extra environment variables.
    pub fn spawn_pull_through_with(
        &self,
        prefix: &str,
        rules_toml: &str,
        env: &[(&str, &str)],
    ) -> super::Wharf {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{}\n{rules_toml}",
            self.storage_toml(prefix, &dir.path().join("scratch")),
        );
        let mut env = env.to_vec();
        env.push(("S3_TEST_SECRET", SECRET_KEY));
        super::spawn_wharf_config(dir, &body, &env, &[])
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
