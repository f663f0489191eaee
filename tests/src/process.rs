//! The real binaries, as child processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary, built next to the test executables by `cargo test --workspace`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run the tests with `cargo test --workspace`", path.display());
    path
}

/// A running `omni-control-plane`, killed when dropped.
pub struct ControlPlane {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// The admin key printed at first start, if this start created one.
    pub generated_admin_key: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    pub database_url: Option<String>,
    pub master_key: Option<String>,
    pub bootstrap_api_key: Option<String>,
}

impl ControlPlane {
    /// Starts the binary on a free loopback port and waits until it listens.
    pub async fn start(data_dir: &Path, options: &ControlPlaneOptions) -> ControlPlane {
        match Self::try_start(data_dir, options).await {
            Ok(cp) => cp,
            Err(message) => panic!("{message}"),
        }
    }

    /// Like `start`, but a control plane that exits instead of listening is an `Err` with its log.
    pub async fn try_start(data_dir: &Path, options: &ControlPlaneOptions) -> Result<ControlPlane, String> {
        std::fs::create_dir_all(data_dir.parent().expect("data dir has a parent")).unwrap();
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut command = Command::new(binary("omni-control-plane"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("OMNI_DATABASE_URL")
            .env_remove("OMNI_MASTER_KEY")
            .env_remove("OMNI_MASTER_KEY_FILE")
            .env_remove("OMNI_BOOTSTRAP_API_KEY")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(url) = &options.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(key) = &options.master_key {
            command.env("OMNI_MASTER_KEY", key);
        }
        if let Some(key) = &options.bootstrap_api_key {
            command.env("OMNI_BOOTSTRAP_API_KEY", key);
        }
        let mut child = command.spawn().expect("spawn omni-control-plane");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut generated_admin_key = None;
        let startup = async {
            while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
                if let Some(key) = line.trim().strip_prefix("export OMNI_API_KEY=") {
                    generated_admin_key = Some(key.to_owned());
                }
                if let Some(addr) = line.strip_prefix("omni-control-plane listening on ") {
                    return Ok(addr.trim().to_owned());
                }
            }
            Err("exited before listening".to_owned())
        };
        let addr = match tokio::time::timeout(Duration::from_secs(60), startup).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(reason)) => {
                let _ = child.wait().await;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("omni-control-plane {reason}; its log:\n{log}"));
            }
            Err(_) => return Err("omni-control-plane did not listen within 60s".to_owned()),
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ControlPlane { child, addr, data_dir: data_dir.to_owned(), log_path, generated_admin_key })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks the process to stop (SIGTERM) and waits for its exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running child has a pid");
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("control plane stops within 30s of SIGTERM")
            .expect("wait for control plane")
    }
}

/// The outcome of one `omnictl` run.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "omnictl failed: {self:?}");
        &self.stdout
    }

    /// Asserts a failure with exactly one line on stderr, and returns that line.
    #[track_caller]
    pub fn failed(&self) -> &str {
        assert_ne!(self.code, 0, "omnictl should have failed: {self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "one line on stderr: {self:?}");
        self.stderr.trim_end()
    }

    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("omnictl printed invalid JSON ({e}): {self:?}"))
    }
}

/// Runs `omnictl` against `server` with `api_key`.
pub async fn omnictl(server: &str, api_key: &str, args: &[&str]) -> Outcome {
    let output = Command::new(binary("omnictl"))
        .args(args)
        .env("OMNI_SERVER", server)
        .env("OMNI_API_KEY", api_key)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run omnictl");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
