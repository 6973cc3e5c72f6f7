//! Collects finished spans and hands them to the exporter a whole batch at a time.
//!
//! The SDK offers two batch processors, and neither fits a sidecar that finishes two spans per
//! message at tens of thousands of messages a second. The one for async runtimes sends every
//! span through a channel to its export task, so each message wakes that task (and often a
//! parked worker thread) twice; the thread-based one needs an exporter that works outside the
//! tokio runtime, which the OTLP exporters built here do not. [`SpanBatcher`] appends each span to
//! a locked vector and wakes its export task only when a batch is full, when the schedule delay
//! has passed, or to flush.
//!
//! Bounded like the SDK's: at most `max_queue_size` spans wait (full batches queued for export
//! plus the one being filled; at least one full batch may queue, so a queue smaller than two
//! batches holds up to two); beyond that spans are dropped and counted, never blocking a
//! message. Exports run one at a time, each cut off after `export_timeout`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;

/// The `OTEL_BSP_*` settings, with the specification's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans that may wait for export.
    pub max_queue_size: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per export request.
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY`: how long a partly filled batch may wait.
    pub scheduled_delay: Duration,
    /// `OTEL_BSP_EXPORT_TIMEOUT`: how long one export may take.
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_millis(5000),
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

enum Control {
    Flush(std::sync::mpsc::SyncSender<OTelSdkResult>),
    Shutdown(std::sync::mpsc::SyncSender<OTelSdkResult>),
    SetResource(Resource),
}

/// A span processor that batches in memory and exports from one tokio task.
#[derive(Debug)]
pub struct SpanBatcher {
    filling: Arc<Mutex<Vec<SpanData>>>,
    batch_size: usize,
    full: mpsc::Sender<Vec<SpanData>>,
    control: mpsc::UnboundedSender<Control>,
    /// Waiting for a flush or shutdown longer than this means the export task is stuck.
    export_timeout: Duration,
    dropped: AtomicUsize,
    shut_down: AtomicBool,
}

impl SpanBatcher {
    /// Starts the export task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new<E: SpanExporter + 'static>(exporter: E, config: BatchConfig) -> SpanBatcher {
        let batch_size = config
            .max_export_batch_size
            .clamp(1, config.max_queue_size.max(1));
        let filling = Arc::new(Mutex::new(Vec::with_capacity(batch_size)));
        // The batch being filled counts against the queue too.
        let queued_batches = (config.max_queue_size / batch_size)
            .saturating_sub(1)
            .max(1);
        let (full, full_rx) = mpsc::channel(queued_batches);
        let (control, control_rx) = mpsc::unbounded_channel();
        let task = ExportTask {
            exporter,
            filling: filling.clone(),
            full: full_rx,
            control: control_rx,
            config,
            failing: false,
        };
        tokio::spawn(task.run());
        SpanBatcher {
            filling,
            batch_size,
            full,
            control,
            export_timeout: config.export_timeout,
            dropped: AtomicUsize::new(0),
            shut_down: AtomicBool::new(false),
        }
    }

    fn drop_spans(&self, count: usize) {
        if self.dropped.fetch_add(count, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "trace export cannot keep up: spans are being dropped (raise OTEL_BSP_MAX_QUEUE_SIZE or sample fewer traces)"
            );
        }
    }

    /// Sends `control` to the export task and waits for its answer, at most `timeout`.
    fn ask(
        &self,
        control: impl FnOnce(std::sync::mpsc::SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(control(reply))
            .map_err(|_| OTelSdkError::InternalFailure("the export task has stopped".into()))?;
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(
                OTelSdkError::InternalFailure("the export task has stopped".into()),
            ),
        }
    }
}

impl SpanProcessor for SpanBatcher {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() || self.shut_down.load(Ordering::Relaxed) {
            return;
        }
        let batch = {
            let mut filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
            filling.push(span);
            if filling.len() < self.batch_size {
                return;
            }
            std::mem::replace(&mut *filling, Vec::with_capacity(self.batch_size))
        };
        if let Err(e) = self.full.try_send(batch) {
            let batch = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            self.drop_spans(batch.len());
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.shut_down.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        // The export in progress, every queued batch and the one being filled may each need
        // a whole export timeout.
        let queued = u32::try_from(self.full.max_capacity() + 2).unwrap_or(u32::MAX);
        self.ask(Control::Flush, self.export_timeout.saturating_mul(queued))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "spans dropped because trace export could not keep up"
            );
        }
        self.ask(Control::Shutdown, timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::SetResource(resource.clone()));
    }
}

struct ExportTask<E> {
    exporter: E,
    filling: Arc<Mutex<Vec<SpanData>>>,
    full: mpsc::Receiver<Vec<SpanData>>,
    control: mpsc::UnboundedReceiver<Control>,
    config: BatchConfig,
    /// Whether the last export failed: failures are logged when they start and when they end,
    /// not once per batch.
    failing: bool,
}

impl<E: SpanExporter> ExportTask<E> {
    async fn run(mut self) {
        // A zero delay (allowed by the variable) means "as soon as possible", not "never".
        let period = self.config.scheduled_delay.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                Some(batch) = self.full.recv() => {
                    // A failure is logged by export; the batch is lost either way.
                    let _ = self.export(batch).await;
                }
                _ = tick.tick() => {
                    let batch = self.take_filling();
                    let _ = self.export(batch).await;
                }
                control = self.control.recv() => match control {
                    Some(Control::SetResource(resource)) => self.exporter.set_resource(&resource),
                    Some(Control::Flush(reply)) => {
                        let _ = reply.send(self.drain().await);
                    }
                    Some(Control::Shutdown(reply)) => {
                        let drained = self.drain().await;
                        let _ = reply.send(drained.and(self.exporter.shutdown()));
                        break;
                    }
                    // The processor is gone: nobody can flush or shut down any more.
                    None => break,
                },
            }
        }
    }

    fn take_filling(&self) -> Vec<SpanData> {
        std::mem::take(&mut *self.filling.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Exports every queued batch and the one being filled.
    async fn drain(&mut self) -> OTelSdkResult {
        let mut result = Ok(());
        while let Ok(batch) = self.full.try_recv() {
            result = result.and(self.export(batch).await);
        }
        let batch = self.take_filling();
        result.and(self.export(batch).await)
    }

    async fn export(&mut self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let spans = batch.len();
        let timeout = self.config.export_timeout;
        let result = match tokio::time::timeout(timeout, self.exporter.export(batch)).await {
            Ok(result) => result,
            Err(_) => Err(OTelSdkError::Timeout(timeout)),
        };
        match (&result, self.failing) {
            (Err(e), false) => {
                tracing::warn!(error = %e, spans, "trace export failed; spans are lost until it works again");
            }
            (Ok(()), true) => tracing::info!("trace export works again"),
            _ => {}
        }
        self.failing = result.is_err();
        result
    }
}
