//! The binary: parse configuration, set up logging, run, pick the exit code (64 for bad
//! configuration, as sysexits says; 69 when `check` finds a dependency unavailable).

use std::ffi::OsString;
use std::process::ExitCode;

use rabbit_sidecar::cli::{self, Mode};
use rabbit_sidecar::config::{Config, Layers, ProcessEnv, env_name};
use rabbit_sidecar::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_CONFIG: u8 = 78;

fn load(mode: Mode, args: Vec<OsString>) -> Result<Config, ExitCode> {
    let flags = match cli::parse(mode, args) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            return Err(if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    Layers::collect(flags, &ProcessEnv)
        .and_then(|l| l.build())
        .map_err(|e| {
            eprintln!("rabbit-sidecar: configuration error: {e}");
            ExitCode::from(EX_USAGE)
        })
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let sub = args.get(1).and_then(|a| a.to_str()).map(str::to_string);
    match sub.as_deref() {
        Some("healthcheck") => return healthcheck(&args[2..]).await,
        Some("remediate") => {
            let format = std::env::var(env_name("log-format"))
                .ok()
                .and_then(|f| f.parse().ok())
                .unwrap_or(rabbit_sidecar::telemetry::LogFormat::Text);
            let telemetry = Telemetry::init(format).ok();
            let code = rabbit_sidecar::remediate::cli_main(args[2..].to_vec()).await;
            if let Some(t) = telemetry {
                t.shutdown().await;
            }
            return code;
        }
        Some("check") => {
            args.remove(1);
            let config = match load(Mode::Check, args) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let mut report = String::new();
            let result = rabbit_sidecar::check::check(&config, &mut report).await;
            print!("{report}");
            return match result {
                Ok(()) => {
                    println!("check passed");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rabbit-sidecar check: {e}");
                    ExitCode::from(EX_UNAVAILABLE)
                }
            };
        }
        Some("run") => {
            args.remove(1);
        }
        _ => {}
    }
    let config = match load(Mode::Run, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let telemetry = match Telemetry::init(config.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rabbit-sidecar: telemetry set-up failed: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let listener = match std::net::TcpListener::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot bind the admin server");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        queues = %config.queues().join(","),
        nodes = %config.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","),
        target = %config.target_url,
        admin = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "rabbit-sidecar starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let result = rabbit_sidecar::run(config, listener, shutdown).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ rabbit_sidecar::RunError::Topology(_)) => {
            tracing::error!(error = %e, "stopping: the broker's topology conflicts with the configuration");
            eprintln!("rabbit-sidecar: {e}");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            eprintln!("rabbit-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// `rabbit-sidecar healthcheck [--url URL]`: exit 0 when /healthz answers 200. For container
/// HEALTHCHECKs, where the image has no curl. The default URL follows `RABBIT_SIDECAR_LISTEN`.
async fn healthcheck(args: &[OsString]) -> ExitCode {
    let url = match args {
        [flag, url] if flag == "--url" => url.to_string_lossy().into_owned(),
        [] => {
            let listen =
                std::env::var(env_name("listen")).unwrap_or_else(|_| "0.0.0.0:9102".into());
            let port = listen.rsplit(':').next().unwrap_or("9102").to_string();
            format!("http://127.0.0.1:{port}/healthz")
        }
        _ => {
            eprintln!("usage: rabbit-sidecar healthcheck [--url http://127.0.0.1:9102/healthz]");
            return ExitCode::from(EX_USAGE);
        }
    };
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        eprintln!("healthcheck: {url:?} is not a URL");
        return ExitCode::from(EX_USAGE);
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    match tokio::time::timeout(std::time::Duration::from_secs(3), client.get(uri)).await {
        Ok(Ok(r)) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(Ok(r)) => {
            eprintln!("healthcheck: {}", r.status());
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("healthcheck: no answer from {url}");
            ExitCode::FAILURE
        }
    }
}
