//! Extra RabbitMQ nodes started by a test, beside the shared broker: their own node name, AMQP
//! and distribution ports, data, log and config in a temporary directory, and an Erlang cookie of
//! their own in a temporary HOME (shared by the nodes of one cluster and by the CLI that controls
//! them). Dropping a [`Node`] stops it and removes its directory, also on panic.
//!
//! They run the same RabbitMQ as the broker under test ([`super::rabbit`]): the machine's 3.10
//! installation, or RabbitMQ 4 inside the root scripts/rabbitmq4.sh made (`chroot`), with their
//! directories under that root's `/tmp` so the node sees them; [`tempdir`] and [`inside`] give a
//! test files both the test and the node can read.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{Rabbit, rabbit, rabbitmq4_root};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A temporary directory the nodes can read: a plain one for 3.10, one under the RabbitMQ 4
/// root's `/tmp` for 4.
pub fn tempdir() -> tempfile::TempDir {
    match rabbit() {
        Rabbit::V3 => tempfile::tempdir().unwrap(),
        Rabbit::V4 => tempfile::tempdir_in(rabbitmq4_root().join("tmp")).unwrap(),
    }
}

/// `path` (made by [`tempdir`]) as a node sees it.
pub fn inside(path: &Path) -> PathBuf {
    match rabbit() {
        Rabbit::V3 => path.to_path_buf(),
        Rabbit::V4 => Path::new("/").join(
            path.strip_prefix(rabbitmq4_root())
                .unwrap_or_else(|_| panic!("{} is outside the RabbitMQ 4 root", path.display())),
        ),
    }
}

/// A command running RabbitMQ's `program` (a full path in its installation) with `env`: directly
/// for 3.10 (in the test's environment), inside the RabbitMQ 4 root for 4 (with only `env` and a
/// PATH).
fn rabbitmq_command(program: &str, env: &[(&str, OsString)]) -> Command {
    match rabbit() {
        Rabbit::V3 => {
            let mut c = Command::new(program);
            c.envs(env.iter().map(|(k, v)| (k, v)));
            c
        }
        Rabbit::V4 => {
            let mut c = Command::new("chroot");
            c.arg(rabbitmq4_root())
                .arg("/usr/bin/env")
                .arg("-i")
                .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
                .arg("LANG=C.UTF-8");
            for (k, v) in env {
                let mut kv = OsString::from(k);
                kv.push("=");
                kv.push(v);
                c.arg(kv);
            }
            c.arg(program);
            c
        }
    }
}

/// A HOME with an Erlang cookie: nodes sharing it can cluster, and the CLI can reach them.
pub struct Cookie {
    dir: tempfile::TempDir,
}

impl Cookie {
    pub fn new() -> Cookie {
        let dir = tempdir();
        let cookie: String = (0..32)
            .map(|_| (b'A' + rand::random_range(0..26u8)) as char)
            .collect();
        let path = dir.path().join(".erlang.cookie");
        std::fs::write(&path, cookie).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Cookie { dir }
    }
    pub fn home(&self) -> &Path {
        self.dir.path()
    }
}

/// A port below the ephemeral range (where a client socket can hold a port we then fail to
/// listen on), free at the time of asking, together with the next one. Never one this process
/// handed out before: nodes started side by side would otherwise race for an overlapping pair
/// between the check here and their own bind.
pub fn free_port_pair() -> (u16, u16) {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let p = rand::random_range(12000..24000u16);
        if given.iter().any(|g| g.abs_diff(p) <= 1) {
            continue;
        }
        let a = std::net::TcpListener::bind(("127.0.0.1", p));
        let b = std::net::TcpListener::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            given.extend([p, p + 1]);
            return (p, p + 1);
        }
    }
    panic!("no free port pair below 24000");
}

pub struct Node {
    /// `rs...@localhost`
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    home: PathBuf,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl Node {
    /// Starts a node whose `rabbitmq.conf` is `conf` plus a plain listener on a fresh port (unless
    /// `conf` mentions `listeners.tcp`). Waits until it has booted.
    pub fn start(prefix: &str, cookie: &Cookie, conf: &str) -> Node {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}{}x{}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let (amqp_port, dist_port) = free_port_pair();
        let dir = tempdir();
        let d = dir.path();
        let n = inside(d);
        let mut config = conf.replace("{AMQP_PORT}", &amqp_port.to_string());
        if !config.contains("listeners.tcp") {
            config.push_str(&format!("\nlisteners.tcp.1 = 127.0.0.1:{amqp_port}\n"));
        }
        config.push_str("loopback_users = none\n");
        std::fs::write(d.join("rabbitmq.conf"), config).unwrap();
        std::fs::write(d.join("enabled_plugins"), "[].\n").unwrap();
        // An empty rabbitmq-env.conf: the installation's (the RabbitMQ 4 root's names the shared
        // node and its ports) must not apply.
        std::fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        let log = std::fs::File::create(d.join("console.log")).unwrap();
        let env: Vec<(&str, OsString)> = vec![
            ("HOME", inside(cookie.home()).into()),
            ("RABBITMQ_NODENAME", name.clone().into()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string().into()),
            ("RABBITMQ_CONF_ENV_FILE", n.join("rabbitmq-env.conf").into()),
            ("RABBITMQ_MNESIA_BASE", n.join("mnesia").into()),
            ("RABBITMQ_LOG_BASE", n.join("log").into()),
            ("RABBITMQ_PID_FILE", n.join("pid").into()),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                n.join("enabled_plugins").into(),
            ),
            ("RABBITMQ_CONFIG_FILE", n.join("rabbitmq.conf").into()),
        ];
        let child = rabbitmq_command(SERVER, &env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        let node = Node {
            name,
            amqp_port,
            dist_port,
            home: cookie.home().to_path_buf(),
            dir: Some(dir),
            child: Some(child),
        };
        node.await_startup();
        node
    }

    /// Waits until the node has booted (at most 90 s); the CLI refuses at once while the VM has
    /// not registered its name yet, so this asks again until then.
    pub fn await_startup(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let r = self.ctl(&["await_startup", "--timeout", "60"]);
            if r.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not boot:\n{}\n{r:?}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn console(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("console.log")).ok())
            .map(|s| {
                s.chars()
                    .rev()
                    .take(4000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// `rabbitmqctl -n <this node> args`, bounded in time.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        ctl(&self.home, &self.name, args)
    }

    /// Stops the node (the Erlang VM exits) and waits for it, at most 60 s.
    pub fn stop(&mut self) {
        let _ = self.ctl(&["stop"]);
        self.reap(Duration::from_secs(60));
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn reap(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Some(child) = self.child.as_mut() {
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Ok(None) = child.try_wait() {
                // The wrapper script did not finish: kill the VM it started (by the PID file the
                // node wrote), then the wrapper.
                if let Some(pid) = self
                    .dir
                    .as_ref()
                    .and_then(|d| std::fs::read_to_string(d.path().join("pid")).ok())
                    .and_then(|s| s.trim().parse::<u32>().ok())
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.child = None;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.ctl(&["stop"]);
            self.reap(Duration::from_secs(30));
        }
        // TempDir removes the data directory.
        self.dir.take();
    }
}

pub fn ctl(home: &Path, node: &str, args: &[&str]) -> Result<String, String> {
    let ctl = rabbitmq_command(CTL, &[("HOME", inside(home).into())]);
    let out = Command::new("timeout")
        .arg("90")
        .arg(ctl.get_program())
        .args(ctl.get_args())
        .envs(ctl.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .arg("-n")
        .arg(node)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
