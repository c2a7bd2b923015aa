//! Configuration: TOML file → environment overrides → typed, validated
//! [`Config`]. Unknown keys and bad values are refused with their key path.
//!
//! Every key has a default, so wharf runs with no file at all. Environment
//! variables `WHARF_<SECTION>_<KEY>` (for example `WHARF_SERVER_LISTEN`)
//! override the file; the full list is [`ENV_OVERRIDES`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A client must send its request headers within this time.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers) accepted; larger
    /// gets 431.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: bytesize::ByteSize,
    /// `text` (human) or `json` logs.
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Storage backend. Only `filesystem` so far.
    #[serde(rename = "type", default)]
    pub kind: StorageKind,
    /// Data directory of the filesystem backend.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Upload sessions idle for longer than this are purged.
    #[serde(default = "default_upload_max_age", with = "humantime_serde")]
    pub upload_max_age: Duration,
    /// How often to look for abandoned uploads.
    #[serde(default = "default_upload_purge_interval", with = "humantime_serde")]
    pub upload_purge_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Filesystem,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:5000".parse().expect("default address")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_size() -> bytesize::ByteSize {
    bytesize::ByteSize::kib(64)
}
fn default_path() -> PathBuf {
    PathBuf::from("./wharf-data")
}
fn default_upload_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_upload_purge_interval() -> Duration {
    Duration::from_secs(3600)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: None,
            shutdown_timeout: default_shutdown_timeout(),
            header_read_timeout: default_header_read_timeout(),
            max_header_size: default_max_header_size(),
            log_format: LogFormat::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::default(),
            path: default_path(),
            upload_max_age: default_upload_max_age(),
            upload_purge_interval: default_upload_purge_interval(),
        }
    }
}

/// Every key an environment variable may override, as a dotted path.
/// The variable is `WHARF_` + the path upper-cased with `.` → `_`.
pub const ENV_OVERRIDES: &[&str] = &[
    "server.listen",
    "server.tls.cert",
    "server.tls.key",
    "server.shutdown_timeout",
    "server.header_read_timeout",
    "server.max_header_size",
    "server.log_format",
    "storage.type",
    "storage.path",
    "storage.upload_max_age",
    "storage.upload_purge_interval",
];

/// Variables with the `WHARF_` prefix that are not configuration keys.
const ENV_RESERVED: &[&str] = &["WHARF_LOG"];

fn env_name(path: &str) -> String {
    format!("WHARF_{}", path.replace('.', "_").to_ascii_uppercase())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown environment variable {0}; known: {known}", known = ENV_OVERRIDES.iter().map(|p| env_name(p)).collect::<Vec<_>>().join(", "))]
    UnknownEnv(String),
}

impl Config {
    /// Loads `file` (or the embedded defaults when `None`), applies the
    /// `WHARF_*` variables from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_path_buf(),
                        message: e.to_string().trim().to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            if !name.starts_with("WHARF_") || ENV_RESERVED.contains(&name.as_str()) {
                continue;
            }
            let path = ENV_OVERRIDES
                .iter()
                .find(|p| env_name(p) == name)
                .ok_or_else(|| ConfigError::UnknownEnv(name.clone()))?;
            // Every overridable key takes a string (durations and sizes too).
            set_path(&mut table, path, toml::Value::String(value));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Invalid {
                    key: e.path().to_string(),
                    message: e.inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.to_string(),
            message: message.to_string(),
        };
        if self.server.max_header_size.as_u64() < 8192 {
            return Err(invalid("server.max_header_size", "must be at least 8KiB"));
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(invalid(
                "server.header_read_timeout",
                "must be greater than zero",
            ));
        }
        if self.storage.upload_purge_interval.is_zero() {
            return Err(invalid(
                "storage.upload_purge_interval",
                "must be greater than zero",
            ));
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        Ok(())
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("table");
    }
    t.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(s: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, s).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.storage.path, PathBuf::from("./wharf-data"));
        assert_eq!(c.storage.kind, StorageKind::Filesystem);
    }

    #[test]
    fn the_shipped_example_is_valid_and_documents_every_override() {
        let text = include_str!("../../config/wharf.toml");
        let c = load_str(text, &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000".parse().unwrap());
        for path in ENV_OVERRIDES {
            let key = path.rsplit('.').next().unwrap();
            assert!(
                text.contains(key),
                "config/wharf.toml does not document {path}"
            );
        }
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            &[
                ("WHARF_SERVER_LISTEN", "127.0.0.1:7000"),
                ("WHARF_STORAGE_UPLOAD_MAX_AGE", "2h"),
                ("WHARF_SERVER_TLS_CERT", "c.pem"),
                ("WHARF_SERVER_TLS_KEY", "k.pem"),
                ("WHARF_LOG", "debug"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.storage.upload_max_age, Duration::from_secs(7200));
        assert_eq!(c.server.tls.unwrap().cert, PathBuf::from("c.pem"));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values_with_the_key_path() {
        let e = load_str("[server]\nlisen = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server"), "{e}");
        assert!(e.contains("lisen"), "{e}");
        let e = load_str("[server]\nlisten = \"nope\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = load_str("[storage]\nupload_max_age = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("storage.upload_max_age:"), "{e}");
        let e = load_str("[storage]\ntype = \"floppy\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("storage.type:"), "{e}");
        let e = load_str("[nope]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = load_str("", &[("WHARF_SERVER_LISTEN", "bad")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = load_str("", &[("WHARF_SERVER_NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WHARF_SERVER_NOPE"), "{e}");
        let e = load_str("[server\n", &[]).unwrap_err().to_string();
        assert!(e.contains("w.toml"), "{e}");
        let e = load_str("[server]\nmax_header_size = \"1KiB\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.max_header_size:"), "{e}");
    }
}
