//! The binary: parse the command line, set up logging, run the subcommand, pick the exit code.
//!
//! | code | meaning (as sysexits names them) |
//! |------|----------------------------------|
//! | 0    | done (after SIGTERM/SIGINT, for `run`) |
//! | 1    | `healthcheck`: not healthy; otherwise a failure while running |
//! | 64   | bad flags, variables or configuration file (`EX_USAGE`) |
//! | 69   | `check`: the broker, the queue or the app is unavailable; `dead-letters`: no broker node, or the dead-letter queue or the destination cannot be used (`EX_UNAVAILABLE`) |
//! | 71   | the admin server's address cannot be bound (`EX_OSERR`) |
//! | 78   | the broker holds declarations that conflict with the configuration, or the OpenTelemetry settings are unusable (`EX_CONFIG`) |
//! | 130  | `dead-letters replay` interrupted by SIGINT or SIGTERM (it stops between two messages) |

use std::process::ExitCode;

use rabbit_sidecar::cli::{self, Invocation};
use rabbit_sidecar::config::{Config, EnvSource, Layers, ProcessEnv, keys};
use rabbit_sidecar::telemetry::{LogFormat, Telemetry};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_OSERR: u8 = 71;
const EX_CONFIG: u8 = 78;

#[tokio::main]
async fn main() -> ExitCode {
    let invocation = match cli::parse(std::env::args_os()) {
        Ok(i) => i,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match invocation {
        Invocation::Run(flags) => match configure(flags) {
            Ok(config) => run(config).await,
            Err(code) => code,
        },
        Invocation::Check(flags) => match configure(flags) {
            Ok(config) => check(config).await,
            Err(code) => code,
        },
        Invocation::Healthcheck { url } => healthcheck(url).await,
        Invocation::DeadLetters(invocation) => rabbit_sidecar::deadletters::main(invocation).await,
        Invocation::Remediate(args) => {
            let format = ProcessEnv
                .var(&keys::LOG_FORMAT.env())
                .and_then(|f| f.parse().ok())
                .unwrap_or(LogFormat::Text);
            let telemetry = Telemetry::init(format).ok();
            let code = rabbit_sidecar::remediate::main(args).await;
            if let Some(t) = telemetry {
                t.shutdown().await;
            }
            code
        }
    }
}

fn configure(flags: std::collections::BTreeMap<String, String>) -> Result<Config, ExitCode> {
    Layers::collect(flags, &ProcessEnv)
        .and_then(|l| l.build())
        .map_err(|e| {
            eprintln!("rabbit-sidecar: configuration error: {e}");
            ExitCode::from(EX_USAGE)
        })
}

async fn run(config: Config) -> ExitCode {
    let telemetry = match Telemetry::init(config.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rabbit-sidecar: telemetry set-up failed: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let listener = match std::net::TcpListener::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot bind the admin server");
            telemetry.shutdown().await;
            return ExitCode::from(EX_OSERR);
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
    let result = rabbit_sidecar::run_until_signalled(config, listener, shutdown).await;
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

async fn check(config: Config) -> ExitCode {
    let mut report = String::new();
    let result = rabbit_sidecar::check::check(&config, &mut report).await;
    print!("{report}");
    match result {
        Ok(()) => {
            println!("check passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rabbit-sidecar check: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Exit 0 when `/healthz` answers 200. Without a URL, the port comes from
/// `RABBIT_SIDECAR_LISTEN`, as the sidecar beside it reads it.
async fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let listen = ProcessEnv
            .var(&keys::LISTEN.env())
            .or(keys::LISTEN.default_text().map(str::to_string))
            .unwrap_or_default();
        let port = listen.rsplit(':').next().unwrap_or("9102").to_string();
        format!("http://127.0.0.1:{port}/healthz")
    });
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
