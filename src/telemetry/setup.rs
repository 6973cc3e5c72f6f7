//! Process-wide logging and trace export, set up once at start and flushed once at exit.
//!
//! Logs go to stderr as text or JSON lines (`--log-format`), filtered by `RUST_LOG` (default
//! `info`). Spans are exported over OTLP only when an endpoint is configured, by the standard
//! variables:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | full URL of the traces endpoint, used as is |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL; `/v1/traces` is appended for http/protobuf |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` | `http/protobuf` (default) or `grpc` |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` | export timeout in milliseconds (default 10000) |
//! | `OTEL_SERVICE_NAME` | `service.name` (default `rabbit-sidecar`) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampler (default `parentbased_always_on`) |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (default) or `none` |
//! | `OTEL_SDK_DISABLED` | `true` turns export off |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` | `key=value,...` sent with every export (values percent-encoded) |
//! | `OTEL_BSP_SCHEDULE_DELAY` | longest wait of a partly filled batch, milliseconds (default 5000) |
//! | `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | spans per export request (default 512) |
//! | `OTEL_BSP_MAX_QUEUE_SIZE` | spans that may wait for export before new ones are dropped (default 2048) |
//! | `OTEL_BSP_EXPORT_TIMEOUT` | timeout of one export, milliseconds (default: the exporter's timeout) |
//!
//! With no endpoint no tracer is installed at all, so a delivery costs one lean `tracing` span
//! and nothing more; [`super::trace`] still hands the producer's context on. A bad value is an
//! error naming the variable, so a typo fails at start rather than silently losing traces.
//!
//! Finished spans are batched by [`super::span_batch`] and, for http/protobuf, encoded and sent
//! by [`super::otlp`]; gRPC export uses the OTLP exporter crate, which reads the headers
//! variables from the process environment itself.
//!
//! Export runs on the tokio runtime (batch task, tonic or hyper without TLS or proxies), so
//! [`Telemetry::init`] must be called inside the runtime, and [`Telemetry::shutdown`] awaited
//! before it stops: that flushes what is queued and gives up after [`SHUTDOWN_GRACE`]. Merely
//! dropping the handle stops export in the background with no promise that anything is flushed.
//!
//! Only the spans [`super::trace`] builds reach the exporter, whatever `RUST_LOG` says: the log
//! filter cannot switch traces off, and the exporter's own HTTP/gRPC stack does not trace itself.

use crate::env::{EnvSource, ProcessEnv};
use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{ExporterBuildError, Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::Subscriber;

use crate::telemetry::otlp::{HttpExporter, parse_headers};
use crate::telemetry::span_batch::{BatchConfig, SpanBatcher};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// How long [`Telemetry::shutdown`] waits for the last export before giving up on it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const DEFAULT_SERVICE_NAME: &str = "rabbit-sidecar";
/// The log filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=off";
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const TRACES_PATH: &str = "/v1/traces";

/// The shape of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected \"text\" or \"json\", got {other:?}")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A variable holds a value we cannot use; the message names both.
    #[error("{var}: {problem}")]
    Invalid { var: &'static str, problem: String },
    #[error("building the OTLP trace exporter: {0}")]
    Exporter(#[from] ExporterBuildError),
    #[error("installing the global tracing subscriber: {0}")]
    Install(String),
}

/// Handle on the installed telemetry; keep it until the end of `main` and await
/// [`Telemetry::shutdown`] there.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber configured by the process environment.
    pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
        Self::init_with_env(format, &ProcessEnv)
    }

    /// Installs the global subscriber configured by `env` (a variable lookup), so tests need not
    /// touch the process environment.
    pub fn init_with_env(
        format: LogFormat,
        env: &dyn EnvSource,
    ) -> Result<Telemetry, TelemetryError> {
        let (telemetry, dispatch) = Self::build(format, env)?;
        // On failure, dropping `telemetry` stops the exporter nobody will use.
        dispatch
            .try_init()
            .map_err(|e| TelemetryError::Install(e.to_string()))?;
        Ok(telemetry)
    }

    /// Builds the subscriber without installing it, for tests that scope it with
    /// `tracing::dispatcher::set_default` (a process can install only one global subscriber).
    pub fn build(
        format: LogFormat,
        env: &dyn EnvSource,
    ) -> Result<(Telemetry, tracing::Dispatch), TelemetryError> {
        Self::build_inner(
            format,
            env,
            std::io::stderr,
            std::io::stderr().is_terminal(),
        )
    }

    /// [`Telemetry::build`] with log lines going to `writer` (without colours) instead of
    /// stderr, so a test can read what an operator would see.
    pub fn build_with_writer<W>(
        format: LogFormat,
        env: &dyn EnvSource,
        writer: W,
    ) -> Result<(Telemetry, tracing::Dispatch), TelemetryError>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        Self::build_inner(format, env, writer, false)
    }

    fn build_inner<W>(
        format: LogFormat,
        env: &dyn EnvSource,
        writer: W,
        ansi: bool,
    ) -> Result<(Telemetry, tracing::Dispatch), TelemetryError>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let env = |name: &str| env.var(name).filter(|v| !v.trim().is_empty());
        // lapin logs every refused declaration and closed channel at error level; the sidecar
        // reports what matters as its own events, so lapin speaks only when asked to.
        let filter_spec = env
            .var("RUST_LOG")
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned());
        let filter = EnvFilter::try_new(&filter_spec).map_err(|e| TelemetryError::Invalid {
            var: "RUST_LOG",
            problem: format!("{filter_spec:?}: {e}"),
        })?;
        let provider = ExportConfig::from_env(&env)?
            .map(ExportConfig::into_provider)
            .transpose()?;

        let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(ansi)
                .boxed(),
            // The span list carries the process span's trace_id into lines logged from its
            // children (the HTTP client span) too.
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(writer)
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        };
        let otel = provider
            .as_ref()
            .map(|p| otel_layer(p.tracer(DEFAULT_SERVICE_NAME)));
        let subscriber = tracing_subscriber::registry()
            .with(fmt_layer.with_filter(filter))
            .with(otel);
        Ok((Telemetry { provider }, tracing::Dispatch::new(subscriber)))
    }

    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans and stops the exporter, waiting at most [`SHUTDOWN_GRACE`].
    pub async fn shutdown(mut self) {
        let Some(done) = self.provider.take().and_then(shut_down_in_background) else {
            return;
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace exporter shutdown failed"),
            Ok(Err(_)) => tracing::warn!("trace exporter shutdown thread died"),
            Err(_) => tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "trace exporter did not flush in time; queued spans are lost"
            ),
        }
    }
}

/// Dropping without [`Telemetry::shutdown`] still stops the exporter, in the background and
/// without waiting for the flush. Left to the SDK, the last provider reference would shut down
/// on the dropping thread and, on a current-thread runtime, wait forever for the batch task that
/// only that thread could run.
impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            shut_down_in_background(provider);
        }
    }
}

/// The SDK's shutdown blocks its caller until the batch task, which runs on the runtime, has
/// exported; so it gets a thread of its own and the caller may await the result. A plain thread
/// rather than `spawn_blocking`, because dropping the runtime would wait for a stuck blocking
/// task forever. The thread holds a provider reference until the shutdown flag is set, so no
/// other drop can start a blocking shutdown of its own.
fn shut_down_in_background(
    provider: SdkTracerProvider,
) -> Option<tokio::sync::oneshot::Receiver<OTelSdkResult>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("otel-shutdown".to_owned())
        .spawn(move || {
            let _ = done_tx.send(provider.shutdown_with_timeout(SHUTDOWN_GRACE));
        });
    match spawned {
        Ok(_) => Some(done_rx),
        Err(e) => {
            tracing::warn!(error = %e, "could not start the trace exporter shutdown");
            None
        }
    }
}

/// The layer that carries the tracer as production installs it, for tests that bring their own
/// tracer (an in-memory exporter). Spans are built by [`super::trace`] with it directly.
pub fn otel_layer<S>(tracer: SdkTracer) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    crate::telemetry::trace::tracer_layer(tracer)
}

/// What the OTLP exporter needs, read from the standard variables.
#[derive(Debug)]
struct ExportConfig {
    endpoint: String,
    protocol: Protocol,
    timeout: Duration,
    service_name: String,
    sampler: Sampler,
    batch: BatchConfig,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, for http/protobuf (the gRPC exporter reads them
    /// from the process environment itself).
    headers: hyper::HeaderMap,
}

impl ExportConfig {
    /// `Ok(None)` when export is off or no endpoint is set.
    fn from_env(env: &dyn EnvSource) -> Result<Option<ExportConfig>, TelemetryError> {
        if let Some(v) = env.var("OTEL_SDK_DISABLED") {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => return Ok(None),
                "false" => {}
                _ => {
                    return Err(invalid(
                        "OTEL_SDK_DISABLED",
                        &v,
                        "expected \"true\" or \"false\"",
                    ));
                }
            }
        }
        if let Some(v) = env.var("OTEL_TRACES_EXPORTER") {
            match v.trim() {
                "none" => return Ok(None),
                "otlp" => {}
                _ => {
                    return Err(invalid(
                        "OTEL_TRACES_EXPORTER",
                        &v,
                        "expected \"otlp\" or \"none\"",
                    ));
                }
            }
        }
        let (protocol_var, protocol) = match env.var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(v)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                env.var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("grpc") => Protocol::Grpc,
            Some(v) => {
                return Err(invalid(
                    protocol_var,
                    v,
                    "expected \"http/protobuf\" or \"grpc\" (http/json is not supported)",
                ));
            }
        };
        let endpoint = if let Some(v) = env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &v)?;
            v
        } else if let Some(v) = env.var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            check_url("OTEL_EXPORTER_OTLP_ENDPOINT", &v)?;
            match protocol {
                Protocol::Grpc => v,
                _ => format!("{}{TRACES_PATH}", v.trim_end_matches('/')),
            }
        } else {
            return Ok(None);
        };
        let timeout = match env.var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(v) => parse_millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", &v)?,
            None => match env.var("OTEL_EXPORTER_OTLP_TIMEOUT") {
                Some(v) => parse_millis("OTEL_EXPORTER_OTLP_TIMEOUT", &v)?,
                None => DEFAULT_EXPORT_TIMEOUT,
            },
        };
        Ok(Some(ExportConfig {
            endpoint,
            protocol,
            timeout,
            service_name: env
                .var("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
            sampler: sampler_from_env(env)?,
            batch: batch_from_env(env, timeout)?,
            headers: headers_from_env(env)?,
        }))
    }

    fn into_provider(self) -> Result<SdkTracerProvider, TelemetryError> {
        let processor = match self.protocol {
            Protocol::Grpc => SpanBatcher::new(
                SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(self.endpoint)
                    .with_timeout(self.timeout)
                    .build()?,
                self.batch,
            ),
            _ => SpanBatcher::new(
                HttpExporter::new(
                    self.endpoint
                        .parse()
                        .expect("checked by check_url when it was read"),
                    self.headers,
                    self.timeout,
                ),
                self.batch,
            ),
        };
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(self.sampler)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(self.service_name)
                    .build(),
            )
            .build())
    }
}

fn sampler_from_env(env: &dyn EnvSource) -> Result<Sampler, TelemetryError> {
    const VAR: &str = "OTEL_TRACES_SAMPLER";
    let ratio = || -> Result<f64, TelemetryError> {
        match env.var("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    invalid(
                        "OTEL_TRACES_SAMPLER_ARG",
                        &v,
                        "expected a ratio from 0 to 1",
                    )
                }),
        }
    };
    let name = env.var(VAR);
    Ok(match name.as_deref().map(str::trim) {
        None | Some("parentbased_always_on") => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        Some("parentbased_traceidratio") => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatioBased(ratio()?),
        Some(v) => {
            return Err(invalid(
                VAR,
                v,
                "expected one of always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off, parentbased_traceidratio",
            ));
        }
    })
}

/// `OTEL_EXPORTER_OTLP_HEADERS`, with `OTEL_EXPORTER_OTLP_TRACES_HEADERS` winning per key.
fn headers_from_env(env: &dyn EnvSource) -> Result<hyper::HeaderMap, TelemetryError> {
    let mut headers = hyper::HeaderMap::new();
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Some(spec) = env.var(var) {
            let parsed =
                parse_headers(&spec).map_err(|problem| TelemetryError::Invalid { var, problem })?;
            for name in parsed.keys() {
                headers.remove(name);
            }
            headers.extend(parsed);
        }
    }
    Ok(headers)
}

/// The `OTEL_BSP_*` variables; the export timeout defaults to the exporter's.
fn batch_from_env(
    env: &dyn EnvSource,
    export_timeout: Duration,
) -> Result<BatchConfig, TelemetryError> {
    let count = |var: &'static str, default: usize| match env.var(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(var, &v, "expected a whole number above zero")),
    };
    let millis = |var: &'static str, default: Duration| match env.var(var) {
        None => Ok(default),
        Some(v) => parse_millis(var, &v),
    };
    let defaults = BatchConfig::default();
    Ok(BatchConfig {
        max_queue_size: count("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size)?,
        max_export_batch_size: count(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size,
        )?,
        scheduled_delay: millis("OTEL_BSP_SCHEDULE_DELAY", defaults.scheduled_delay)?,
        export_timeout: millis("OTEL_BSP_EXPORT_TIMEOUT", export_timeout)?,
    })
}

fn check_url(var: &'static str, value: &str) -> Result<(), TelemetryError> {
    match value.parse::<hyper::Uri>() {
        Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => Ok(()),
        _ => Err(invalid(
            var,
            value,
            "expected an absolute URL such as http://127.0.0.1:4318",
        )),
    }
}

fn parse_millis(var: &'static str, value: &str) -> Result<Duration, TelemetryError> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| invalid(var, value, "expected a whole number of milliseconds"))
}

fn invalid(var: &'static str, value: &str, expected: &str) -> TelemetryError {
    TelemetryError::Invalid {
        var,
        problem: format!("{value:?}: {expected}"),
    }
}
