//! The binary's command line: bad flags, variables and config files exit 64 naming the key and the
//! problem (and never echo an AMQP password); `--help` exits 0; `check` exits 0 when broker, queue
//! and app are usable and 69 otherwise; `healthcheck` exits 0 against a live sidecar and 1 against
//! a dead port. Failures that are not usage errors have codes of their own: unusable
//! OpenTelemetry settings 78, an admin address that cannot be bound 71.

use std::time::Duration;

use crate::common::*;

const EX_USAGE: i32 = 64;
const EX_UNAVAILABLE: i32 = 69;
const EX_OSERR: i32 = 71;
const EX_CONFIG: i32 = 78;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the binary with `args` and `env` (and no inherited `RABBIT_SIDECAR_*` variable); it must
/// exit within 30 seconds.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbit-sidecar"));
    for (name, _) in std::env::vars() {
        if name.starts_with("RABBIT_SIDECAR_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("rabbit-sidecar {args:?} did not exit within 30s"))
        .expect("the binary runs");
    Run {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A configuration error: exit 64, and stderr says each of `needles`.
async fn usage_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> Run {
    let r = run(args, env).await;
    assert_eq!(r.code, EX_USAGE, "{args:?} {env:?} exits 64: {r:?}");
    for needle in needles {
        assert!(
            r.stderr.contains(needle),
            "{args:?} {env:?}: stderr names {needle:?}: {r:?}"
        );
    }
    r
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_the_key_and_the_problem() {
    usage_error(&["--prefech", "10", "--queue", "q"], &[], &["--prefech"]).await;
    usage_error(
        &["--queue", "q", "--prefetch", "abc"],
        &[],
        &["--prefetch", "\"abc\"", "not a whole number"],
    )
    .await;
    usage_error(
        &["--queue", "q", "--prefetch", "0"],
        &[],
        &["--prefetch", "from 1 to 65535"],
    )
    .await;
    usage_error(
        &["--queue", "q"],
        &[("RABBIT_SIDECAR_HANDLER_TIMEOUT", "soon")],
        &[
            "RABBIT_SIDECAR_HANDLER_TIMEOUT",
            "\"soon\"",
            "not a duration",
        ],
    )
    .await;
    usage_error(
        &["--queue", "q", "--concurrency", "100", "--prefetch", "10"],
        &[],
        &["--concurrency", "more than --prefetch"],
    )
    .await;
    usage_error(&[], &[], &["--queue", "required", "RABBIT_SIDECAR_QUEUE"]).await;
    usage_error(
        &["--queue", "q", "--listen", "everywhere"],
        &[],
        &["--listen", "not an address"],
    )
    .await;
    usage_error(
        &["--queue", "q", "--declare=maybe"],
        &[],
        &["--declare", "not a boolean"],
    )
    .await;
    usage_error(
        &["--queue", "q", "--target-url", "https://app:8443/"],
        &[],
        &["--target-url", "https"],
    )
    .await;
    usage_error(
        &["--queue", "q", "--heartbeat", "100000s"],
        &[],
        &["--heartbeat"],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, "queue = \"q\"\nprefech = 10\n").unwrap();
    usage_error(
        &["--config", path],
        &[],
        &[&format!("prefech (in {path})"), "unknown key"],
    )
    .await;
    std::fs::write(&file, "queue = \"q\"\nprefetch = \"lots\"\n").unwrap();
    usage_error(
        &[],
        &[("RABBIT_SIDECAR_CONFIG", path)],
        &[&format!("prefetch (in {path})"), "not a whole number"],
    )
    .await;
    std::fs::write(&file, "queue = \n").unwrap();
    usage_error(&["--config", path], &[], &[path, "TOML"]).await;
    usage_error(
        &["--config", "/nonexistent/sidecar.toml"],
        &[],
        &["/nonexistent/sidecar.toml", "cannot read"],
    )
    .await;

    // The same rules hold for `check`, which must fail before it touches the network.
    usage_error(
        &[
            "check",
            "--queue",
            "q",
            "--concurrency",
            "9",
            "--prefetch",
            "8",
        ],
        &[],
        &["--concurrency"],
    )
    .await;
    usage_error(&["check", "--bogus"], &[], &["--bogus"]).await;
}

#[tokio::test]
async fn an_amqp_password_is_never_echoed() {
    let secret = "s3cret";
    let urls = format!("amqp://u:{secret}@host:5672,http://u:{secret}@x");
    let r = usage_error(
        &["--queue", "q", "--amqp-url", &urls],
        &[],
        &["--amqp-url", "node 2"],
    )
    .await;
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "{r:?}"
    );

    let r = usage_error(
        &["--queue", "q"],
        &[("RABBIT_SIDECAR_AMQP_URL", &urls)],
        &["RABBIT_SIDECAR_AMQP_URL", "node 2"],
    )
    .await;
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "{r:?}"
    );

    let broken = format!("amqp://u:{secret}@[::1:5672/%2f");
    let r = usage_error(
        &["--queue", "q", "--amqp-url", &broken],
        &[],
        &["--amqp-url", "node 1"],
    )
    .await;
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "{r:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    std::fs::write(
        &file,
        format!("queue = \"q\"\namqp-url = [\"amqp://u:{secret}@h1\", \"ftp://u:{secret}@h2\"]\n"),
    )
    .unwrap();
    let r = usage_error(
        &["--config", file.to_str().unwrap()],
        &[],
        &["amqp-url (in", "node 2"],
    )
    .await;
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "{r:?}"
    );

    // A password the broker refuses: `check` fails, and says so without repeating it.
    let wrong = "Wr0ng-pa55-Qx";
    let url = format!("amqp://guest:{wrong}@{}/%2f", amqp_addr());
    let r = run(
        &[
            "check",
            "--amqp-url",
            &url,
            "--queue",
            "q",
            "--connect-timeout",
            "3s",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, EX_UNAVAILABLE, "{r:?}");
    assert!(
        !r.stderr.contains(wrong) && !r.stdout.contains(wrong),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains(&format!("broker {}: FAILED", amqp_addr())),
        "{r:?}"
    );
}

#[tokio::test]
async fn help_and_version_exit_0() {
    let r = run(&["--help"], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    for key in rabbit_sidecar::config::keys::ALL
        .iter()
        .filter(|k| k.is_flag())
    {
        assert!(
            r.stdout.contains(&format!("--{}", key.name)),
            "--help lists --{}: {r:?}",
            key.name
        );
        assert!(
            r.stdout.contains(&key.env()),
            "--help names the variable of {}",
            key.name
        );
    }
    assert!(r.stdout.contains("--config"));
    assert!(r.stderr.is_empty(), "{r:?}");

    let r = run(&["check", "--help"], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("--queue"), "{r:?}");

    let r = run(&["--version"], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(env!("CARGO_PKG_VERSION")), "{r:?}");
}

#[tokio::test]
async fn check_passes_with_an_existing_queue_and_a_running_app() {
    let broker = Broker::connect().await;
    let queue = unique("check-ok");
    broker.declare(&queue, false, false).await;
    broker.publish_n(&queue, 2, "c").await;
    let app = App::start().await;
    let url = app.url();
    let r = run(
        &[
            "check",
            "--amqp-url",
            amqp(),
            "--queue",
            &queue,
            "--target-url",
            &url,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let has = |prefix: &str, rest: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(prefix) && l.contains(rest))
    };
    assert!(has("configuration: ok", &queue), "{r:?}");
    assert!(
        has(&format!("broker {}", amqp_addr()), "connected"),
        "{r:?}"
    );
    assert!(has(&format!("queue {queue:?}"), "exists, 2 ready"), "{r:?}");
    assert!(has(&format!("app {url}"), "reachable"), "{r:?}");
    assert!(
        lines.last().is_some_and(|l| l.contains("check passed")),
        "{r:?}"
    );
    assert!(
        !r.stdout.contains("guest:guest") && !r.stderr.contains("guest:guest"),
        "{r:?}"
    );
    assert_eq!(
        app.count(),
        0,
        "check probes the app without posting a message"
    );
    assert_eq!(
        broker.count(&queue).await,
        Some((2, 0)),
        "check consumes nothing"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn check_exits_69_when_the_queue_is_missing() {
    let broker = Broker::connect().await;
    let queue = unique("check-missing");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let r = run(
        &[
            "check",
            "--amqp-url",
            amqp(),
            "--queue",
            &queue,
            "--target-url",
            &url,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, EX_UNAVAILABLE, "{r:?}");
    assert!(
        r.stdout.contains(&format!("queue {queue:?}: FAILED")) && r.stdout.contains("--declare"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&queue) && r.stderr.contains("not usable"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("check passed"), "{r:?}");

    // With --declare a missing queue is fine (run would create it); check itself creates nothing.
    let r = run(
        &[
            "check",
            "--amqp-url",
            amqp(),
            "--queue",
            &queue,
            "--target-url",
            &url,
            "--declare",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("--declare will create it"), "{r:?}");
    assert_eq!(
        broker.count(&queue).await,
        None,
        "check did not declare the queue"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn check_exits_69_when_the_app_or_the_broker_is_unreachable() {
    let broker = Broker::connect().await;
    let queue = unique("check-app");
    broker.declare(&queue, false, false).await;
    let dead_app = format!("http://127.0.0.1:{}/", free_port());
    let r = run(
        &[
            "check",
            "--amqp-url",
            amqp(),
            "--queue",
            &queue,
            "--target-url",
            &dead_app,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, EX_UNAVAILABLE, "{r:?}");
    assert!(
        r.stdout.contains(&format!("app {dead_app}: FAILED")),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&dead_app) && r.stderr.contains("not reachable"),
        "{r:?}"
    );

    let app = App::start().await;
    let url = app.url();
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let r = run(
        &[
            "check",
            "--amqp-url",
            &dead_broker,
            "--queue",
            &queue,
            "--target-url",
            &url,
            "--connect-timeout",
            "2s",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, EX_UNAVAILABLE, "{r:?}");
    assert!(
        r.stderr.contains("no broker node could be reached"),
        "{r:?}"
    );
    assert!(
        !r.stdout.contains("guest:guest") && !r.stderr.contains("guest:guest"),
        "{r:?}"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn healthcheck_exits_0_against_a_live_sidecar_and_1_against_a_dead_port() {
    let broker = Broker::connect().await;
    let queue = unique("healthcheck");
    broker.track(&queue);
    let app = App::start().await;
    let url = app.url();
    let sidecar = Sidecar::start(&declared(&queue, &url, &[]));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let healthz = format!("http://{}/healthz", sidecar.admin);
    let r = run(&["healthcheck", "--url", &healthz], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    // Without --url it follows RABBIT_SIDECAR_LISTEN.
    let listen = format!("0.0.0.0:{}", sidecar.admin.port());
    let r = run(&["healthcheck"], &[("RABBIT_SIDECAR_LISTEN", &listen)]).await;
    assert_eq!(r.code, 0, "{r:?}");
    // A 404 is not healthy.
    let r = run(
        &[
            "healthcheck",
            "--url",
            &format!("http://{}/nope", sidecar.admin),
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");

    let dead = format!("http://127.0.0.1:{}/healthz", free_port());
    let r = run(&["healthcheck", "--url", &dead], &[]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no answer"), "{r:?}");
    let r = run(&["healthcheck", "--bogus"], &[]).await;
    assert_eq!(r.code, EX_USAGE, "{r:?}");
    assert!(
        r.stderr.contains("--bogus") && r.stderr.contains("Usage: rabbit-sidecar healthcheck"),
        "{r:?}"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn unusable_telemetry_settings_exit_78_naming_the_variable() {
    let r = run(
        &["--queue", "q"],
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")],
    )
    .await;
    assert_eq!(r.code, EX_CONFIG, "{r:?}");
    assert!(
        r.stderr.contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        "{r:?}"
    );
}

#[tokio::test]
async fn an_admin_address_in_use_exits_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let r = run(
        &["--queue", "q", "--listen", &listen, "--log-format", "json"],
        &[],
    )
    .await;
    assert_eq!(r.code, EX_OSERR, "{r:?}");
    assert!(r.stderr.contains("cannot bind the admin server"), "{r:?}");
}
