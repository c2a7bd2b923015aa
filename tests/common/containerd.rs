//! A private containerd for the tests: its own config, root, state and
//! sockets in a temporary directory, driven with `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::{PRINT_MARKER, run, try_run, unique};
use super::require_tool;

/// A private containerd: its own config, root, state and sockets in a
/// temporary directory, with only the native snapshotter. Stopped on drop.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start() -> Self {
        require_tool("containerd");
        require_tool("ctr");
        require_tool("runc");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}-ttrpc"

[debug]
  address = "{sock}-debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = socket.display(),
                opt = d.join("opt").display(),
            ),
        )
        .expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut me = Containerd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if me.socket.exists() && try_run(me.ctr().arg("version")).0 {
                return me;
            }
            if let Some(status) = me.child.try_wait().expect("wait") {
                panic!("containerd exited ({status}):\n{}", me.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket);
        cmd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr images pull --hosts-dir CERTS_D` (no `--plain-http`: hosts.toml
    /// says `http://`).
    pub fn pull_via_mirror(&self, certs: &Path, reference: &str) {
        run(self
            .ctr()
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(certs)
            .arg(reference));
    }

    /// The digest `ctr images ls` shows for `reference`.
    pub fn image_digest(&self, reference: &str) -> String {
        let list = run(self.ctr().args(["images", "ls"]));
        let line = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{list}"));
        line.split_whitespace()
            .nth(2)
            .expect("digest column")
            .to_string()
    }

    /// Runs the image and returns what `PRINT_MARKER` printed.
    pub fn run_marker(&self, reference: &str) -> String {
        run(self.ctr().args([
            "run",
            "--rm",
            "--snapshotter",
            "native",
            reference,
            &unique("mirror"),
            "/bin/sh",
            "-c",
            PRINT_MARKER,
        ]))
        .trim()
        .to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
