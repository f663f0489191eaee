//! The real binaries, as child processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary of the same build profile as the running executable: beside it
/// (a benchmark in target/release) or one level up (a test in target/<profile>/deps).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let here = exe.parent().expect("executable's directory");
    let candidates = [here.join(name), here.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("{name} is missing next to {}: build the workspace first (`cargo test --workspace` builds it for the tests, `cargo build --release --workspace` for benchmarks)", exe.display())
    })
}

/// A started child, its log file, and what it printed on stdout before listening.
struct Started {
    child: Child,
    addr: String,
    stdout_lines: Vec<String>,
}

/// Spawns `command` with stderr appended to `log_path`, and waits for the stdout line
/// `<marker><address>`. A child that exits first is an `Err` carrying its log.
async fn spawn_listening(mut command: Command, marker: &str, log_path: &Path) -> Result<Started, String> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log)).kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("spawn: {e}"))?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout_lines = Vec::new();
    let startup = async {
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            if let Some(addr) = line.strip_prefix(marker) {
                return Ok(addr.trim().to_owned());
            }
            stdout_lines.push(line);
        }
        Err("exited before listening".to_owned())
    };
    let addr = match tokio::time::timeout(Duration::from_secs(60), startup).await {
        Ok(Ok(addr)) => addr,
        Ok(Err(reason)) => {
            let _ = child.wait().await;
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(format!("{reason}; its log:\n{log}"));
        }
        Err(_) => return Err("did not listen within 60s".to_owned()),
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Started { child, addr, stdout_lines })
}

/// Asks a child to stop (SIGTERM) and waits for its exit status.
async fn terminate(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id().expect("running child has a pid");
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not stop within 30s of SIGTERM"))
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
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
    /// Default: a free loopback port.
    pub listen: Option<String>,
    pub node_token: Option<String>,
    pub change_log_retention: Option<i64>,
    /// Standalone mode, with the node's HTTP on this address.
    pub embedded_http_listen: Option<String>,
    /// Serve TLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Further flags, as given.
    pub extra_args: Vec<String>,
    /// A command (and its arguments) to run the control plane under, such as a profiler.
    pub wrapper: Vec<String>,
}

/// Calls to the loopback fakes go direct, whatever proxy the tests' own environment names (a
/// test that wants one sets it).
fn without_proxies(command: &mut Command) {
    for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        command.env_remove(name);
    }
}

/// `binary`, or `wrapper` with `binary` as its last argument.
fn wrapped(wrapper: &[String], binary: PathBuf) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

impl ControlPlane {
    /// Starts the binary and waits until it listens.
    pub async fn start(data_dir: &Path, options: &ControlPlaneOptions) -> ControlPlane {
        match Self::try_start(data_dir, options).await {
            Ok(cp) => cp,
            Err(message) => panic!("omni-control-plane {message}"),
        }
    }

    pub async fn try_start(data_dir: &Path, options: &ControlPlaneOptions) -> Result<ControlPlane, String> {
        std::fs::create_dir_all(data_dir.parent().expect("data dir has a parent")).unwrap();
        let log_path = data_dir.with_extension("log");
        let mut command = wrapped(&options.wrapper, binary("omni-control-plane"));
        command
            .arg("--listen")
            .arg(options.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("OMNI_DATABASE_URL")
            .env_remove("OMNI_MASTER_KEY")
            .env_remove("OMNI_MASTER_KEY_FILE")
            .env_remove("OMNI_BOOTSTRAP_API_KEY")
            .env_remove("OMNI_NODE_TOKEN")
            .env("RUST_LOG", "info");
        without_proxies(&mut command);
        if let Some(url) = &options.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(key) = &options.master_key {
            command.env("OMNI_MASTER_KEY", key);
        }
        if let Some(key) = &options.bootstrap_api_key {
            command.env("OMNI_BOOTSTRAP_API_KEY", key);
        }
        if let Some(token) = &options.node_token {
            command.arg(format!("--node-token={token}"));
        }
        if let Some(retention) = options.change_log_retention {
            command.arg("--change-log-retention").arg(retention.to_string());
        }
        if let Some((cert, key)) = &options.tls {
            command.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(http) = &options.embedded_http_listen {
            command.arg("--embedded-data-plane").arg("--http-listen").arg(http);
        }
        command.args(&options.extra_args);
        let started = spawn_listening(command, "omni-control-plane listening on ", &log_path).await?;
        let generated_admin_key =
            started.stdout_lines.iter().find_map(|l| l.trim().strip_prefix("export OMNI_API_KEY=").map(str::to_owned));
        Ok(ControlPlane {
            child: started.child,
            addr: started.addr,
            data_dir: data_dir.to_owned(),
            log_path,
            generated_admin_key,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The admin API key the control plane generated into its data dir at first start.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-api-key")).expect("admin-api-key file").trim().to_owned()
    }

    /// The node token the control plane generated into its data dir.
    pub fn node_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node-token")).expect("node-token file").trim().to_owned()
    }

    /// Stops the process with SIGKILL, as a crash would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks the process to stop (SIGTERM) and waits for its exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, "omni-control-plane").await
    }

    /// Waits (30 s at most) for the process to exit on its own: its status and its log.
    pub async fn exit_unasked(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("omni-control-plane did not exit within 30s")
            .expect("waiting for omni-control-plane");
        (status, self.log())
    }
}

/// A running `omni-data-plane`, killed when dropped.
pub struct DataPlane {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct DataPlaneOptions {
    pub control_plane: String,
    pub node_token: String,
    pub max_instances: Option<usize>,
    pub ca_cert: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    pub tenant_concurrency: Option<usize>,
    /// Environment variables to set (the channels' API URLs, say).
    pub env: Vec<(String, String)>,
    /// Node id (default: generated into the data dir).
    pub node_id: Option<String>,
    /// A command (and its arguments) to run the node under, such as a profiler.
    pub wrapper: Vec<String>,
}

impl DataPlane {
    pub async fn start(data_dir: &Path, options: &DataPlaneOptions) -> DataPlane {
        std::fs::create_dir_all(data_dir.parent().expect("data dir has a parent")).unwrap();
        let log_path = data_dir.with_extension("log");
        let mut command = wrapped(&options.wrapper, binary("omni-data-plane"));
        command
            .args(["--http-listen", "127.0.0.1:0", "--control-plane", &options.control_plane])
            .arg(format!("--node-token={}", options.node_token))
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("OMNI_NODE_CACHE_KEY")
            .env("RUST_LOG", "info");
        without_proxies(&mut command);
        if let Some(ca) = &options.ca_cert {
            command.arg("--ca-cert").arg(ca);
        }
        if let Some(bytes) = options.max_body_bytes {
            command.arg("--max-body-bytes").arg(bytes.to_string());
        }
        if let Some(n) = options.tenant_concurrency {
            command.arg("--tenant-concurrency").arg(n.to_string());
        }
        if let Some(max) = options.max_instances {
            command.arg("--max-instances").arg(max.to_string());
        }
        if let Some(id) = &options.node_id {
            command.arg("--node-id").arg(id);
        }
        for name in ["OMNI_SLACK_API_URL", "OMNI_DISCORD_API_URL", "OMNI_DISCORD_GATEWAY_URL"] {
            command.env_remove(name);
        }
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        match spawn_listening(command, "omni-data-plane listening on ", &log_path).await {
            Ok(started) => {
                DataPlane { child: started.child, addr: started.addr, data_dir: data_dir.to_owned(), log_path }
            }
            Err(message) => panic!("omni-data-plane {message}"),
        }
    }

    /// A node of `cp` (its URL and node token filled into `options`), started in `data_dir`,
    /// once it has applied the control plane's config.
    pub async fn start_for(cp: &ControlPlane, data_dir: &Path, options: DataPlaneOptions) -> DataPlane {
        let options = DataPlaneOptions { control_plane: cp.url(), node_token: cp.node_token(), ..options };
        let node = DataPlane::start(data_dir, &options).await;
        node.wait_for_revision(0).await;
        node
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `GET /ready`: the status code and the JSON body.
    pub async fn ready(&self) -> (u16, serde_json::Value) {
        let (status, body) = http_get(&self.addr, "/ready").await.expect("GET /ready");
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/ready body {body:?}: {e}")))
    }

    /// The value of an unlabelled metric from `GET /metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(&self.addr, "/metrics").await.expect("GET /metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the node has applied `revision` (or later), and returns its /ready body.
    pub async fn wait_for_revision(&self, revision: i64) -> serde_json::Value {
        crate::wait_for(
            &format!("node {} to apply revision {revision}", self.addr),
            Duration::from_secs(15),
            || async {
                let (status, body) = self.ready().await;
                (status == 200 && body["revision"].as_i64() >= Some(revision)).then_some(body)
            },
        )
        .await
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    pub async fn terminate(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, "omni-data-plane").await
    }
}

/// A plain HTTP/1.1 GET on loopback: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"").await
}

/// A plain HTTP/1.1 POST of a JSON body on loopback, with extra headers.
pub async fn http_post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, headers, body).await
}

async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    // A server that accepts and never answers must not hang the test past its deadline.
    tokio::time::timeout(Duration::from_secs(30), exchange(addr, method, path, headers, body)).await.unwrap_or_else(
        |_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{method} {path}: no answer"))),
    )
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
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

/// A long-running `omnictl` (such as `trace tail`) whose stdout is read line by line; killed
/// when dropped.
pub struct OmnictlStream {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl OmnictlStream {
    /// The next line, waiting at most `timeout` (None: stdout closed).
    pub async fn next_line(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("omnictl printed no line within {timeout:?}"))
            .expect("read omnictl's stdout")
    }

    /// Waits for the process to exit: its code and stderr.
    pub async fn exit(mut self) -> (i32, String) {
        use tokio::io::AsyncReadExt;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("omnictl exits")
            .expect("wait for omnictl");
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr).await;
        }
        (status.code().unwrap_or(-1), stderr)
    }
}

pub fn omnictl_stream(server: &str, api_key: &str, args: &[&str]) -> OmnictlStream {
    let mut child = Command::new(binary("omnictl"))
        .args(args)
        .env("OMNI_SERVER", server)
        .env("OMNI_API_KEY", api_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start omnictl");
    let stdout = child.stdout.take().expect("piped stdout");
    OmnictlStream { child, lines: BufReader::new(stdout).lines() }
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
