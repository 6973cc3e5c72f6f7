//! [`SpanBatcher`], the span processor that batches finished spans in memory: full batches go out
//! without a flush, partial ones after the schedule delay or on flush and shutdown, unsampled
//! spans never, a slow exporter makes it drop spans rather than block, and a failing or hanging
//! exporter does not stop later exports.
//!
//! `force_flush` and `shutdown` block their caller until the export task (which runs on the
//! runtime) answers, so they are called from `spawn_blocking` here, as the sidecar calls them from
//! a thread of their own. Waiting for the export task is done by polling with a deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::telemetry::span_batch::{BatchConfig, SpanBatcher};
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider,
    ShouldSample, SpanData, SpanEvents, SpanExporter, SpanLinks, SpanProcessor,
};
use tokio::sync::Semaphore;

/// How long to wait for the export task before failing a test.
const DEADLINE: Duration = Duration::from_secs(5);
/// A schedule delay no test waits for.
const NEVER: Duration = Duration::from_secs(60);

fn config(max_queue_size: usize, max_export_batch_size: usize, delay: Duration) -> BatchConfig {
    BatchConfig {
        max_queue_size,
        max_export_batch_size,
        scheduled_delay: delay,
        export_timeout: Duration::from_secs(30),
    }
}

/// What a [`TestExporter`] saw, shared with the test.
#[derive(Debug, Default)]
struct Record {
    /// Span names of each successful export, in order.
    batches: Mutex<Vec<Vec<String>>>,
    /// Export calls started, including failed and hanging ones.
    calls: AtomicUsize,
    /// Export calls that returned an error.
    failed: AtomicUsize,
    shutdowns: AtomicUsize,
    service_name: Mutex<Option<String>>,
}

impl Record {
    fn batches(&self) -> Vec<Vec<String>> {
        self.batches.lock().unwrap().clone()
    }

    fn sizes(&self) -> Vec<usize> {
        self.batches().iter().map(Vec::len).collect()
    }

    fn exported(&self) -> usize {
        self.sizes().iter().sum()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }
}

/// An exporter that records what it exports and can be made to wait, fail or hang.
#[derive(Debug, Clone, Default)]
struct TestExporter {
    record: Arc<Record>,
    /// When set, every export waits for a permit (none are added: closing it lets all through).
    gate: Option<Arc<Semaphore>>,
    /// The first this many export calls return an error.
    fail_calls: usize,
    /// The first this many export calls never finish.
    hang_calls: usize,
    /// How long each export takes (a slow collector, not synchronisation).
    latency: Duration,
}

impl TestExporter {
    fn gated() -> (TestExporter, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let exporter = TestExporter {
            gate: Some(gate.clone()),
            ..TestExporter::default()
        };
        (exporter, gate)
    }
}

impl SpanExporter for TestExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let this = self.clone();
        async move {
            let call = this.record.calls.fetch_add(1, Ordering::SeqCst);
            if call < this.hang_calls {
                std::future::pending::<()>().await;
            }
            if !this.latency.is_zero() {
                tokio::time::sleep(this.latency).await;
            }
            if let Some(gate) = &this.gate {
                // Closed means released.
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            if call < this.fail_calls {
                this.record.failed.fetch_add(1, Ordering::SeqCst);
                return Err(OTelSdkError::InternalFailure("injected failure".into()));
            }
            let names = batch.iter().map(|s| s.name.to_string()).collect();
            this.record.batches.lock().unwrap().push(names);
            Ok(())
        }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.record.shutdowns.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let name = resource
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .map(|v| v.to_string());
        *self.record.service_name.lock().unwrap() = name;
    }
}

/// A provider whose spans go through a [`SpanBatcher`] to `exporter`, what the exporter records,
/// and a tracer.
fn batching(
    exporter: TestExporter,
    config: BatchConfig,
) -> (Arc<Record>, SdkTracerProvider, SdkTracer) {
    let record = exporter.record.clone();
    let provider = provider(SpanBatcher::new(exporter, config));
    let tracer = provider.tracer("t");
    (record, provider, tracer)
}

fn provider(processor: SpanBatcher) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_span_processor(processor)
        .build()
}

/// Starts and ends spans named `{prefix}{i}` for `i` in `range`.
fn end_spans(tracer: &SdkTracer, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        drop(tracer.start(format!("{prefix}{i}")));
    }
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// Polls `done` every 10 ms until it holds, failing the test after [`DEADLINE`].
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `f` off the runtime's worker threads, as blocking flushes and shutdowns must be.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

async fn flush(provider: &SdkTracerProvider) -> OTelSdkResult {
    let provider = provider.clone();
    blocking(move || provider.force_flush()).await
}

async fn shutdown(provider: &SdkTracerProvider) -> OTelSdkResult {
    let provider = provider.clone();
    blocking(move || provider.shutdown()).await
}

/// A finished span as the SDK would hand it to a processor.
fn span_data(name: &str, sampled: bool) -> SpanData {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: name.to_owned().into(),
        start_time: now,
        end_time: now,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("t").build(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_are_exported_without_a_flush() {
    let exporter = TestExporter::default();
    let (record, provider, tracer) = batching(exporter, config(2048, 4, NEVER));

    end_spans(&tracer, "s", 0..10);
    wait_for("two full batches", || record.exported() >= 8).await;
    assert_eq!(record.batches(), vec![names("s", 0..4), names("s", 4..8)]);
    // The two spans of the partial batch wait for the (distant) schedule delay or a flush.
    assert_eq!(record.calls(), 2, "only full batches go out on their own");

    flush(&provider).await.expect("flush");
    assert_eq!(
        record.batches(),
        vec![names("s", 0..4), names("s", 4..8), names("s", 8..10)]
    );
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_is_clamped_to_the_queue_size() {
    let exporter = TestExporter::default();
    let (record, provider, tracer) = batching(exporter, config(3, 512, NEVER));

    end_spans(&tracer, "s", 0..3);
    wait_for("a batch of the queue size", || record.exported() >= 3).await;
    assert_eq!(record.batches(), vec![names("s", 0..3)]);
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_is_exported_after_the_schedule_delay() {
    let exporter = TestExporter::default();
    let (record, provider, tracer) =
        batching(exporter, config(2048, 512, Duration::from_millis(50)));

    end_spans(&tracer, "a", 0..3);
    wait_for("the scheduled export", || record.exported() >= 3).await;
    assert_eq!(record.batches(), vec![names("a", 0..3)]);

    // The schedule keeps running: a later partial batch goes out on a later tick.
    end_spans(&tracer, "b", 0..2);
    wait_for("the next scheduled export", || record.exported() >= 5).await;
    assert_eq!(record.batches(), vec![names("a", 0..3), names("b", 0..2)]);
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_flush_exports_everything_before_returning() {
    let exporter = InMemorySpanExporter::default();
    let provider = provider(SpanBatcher::new(exporter.clone(), config(2048, 8, NEVER)));
    let tracer = provider.tracer("t");

    end_spans(&tracer, "s", 0..30);
    flush(&provider).await.expect("flush");
    let mut exported: Vec<String> = exporter
        .get_finished_spans()
        .expect("spans")
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    exported.sort_by_key(|n| n[1..].parse::<usize>().unwrap());
    assert_eq!(exported, names("s", 0..30));
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_flush_drains_queued_batches_behind_a_slow_export() {
    let (exporter, gate) = TestExporter::gated();
    // Room for 64 / 4 - 1 = 15 queued batches.
    let (record, provider, tracer) = batching(exporter, config(64, 4, NEVER));

    end_spans(&tracer, "s", 0..4);
    wait_for("the first export to start", || record.calls() == 1).await;
    // Two more full batches wait in the queue and two spans in the batch being filled.
    end_spans(&tracer, "s", 4..14);
    let flushing = {
        let provider = provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush())
    };
    gate.close();
    flushing.await.unwrap().expect("flush");
    assert_eq!(
        record.batches(),
        vec![
            names("s", 0..4),
            names("s", 4..8),
            names("s", 8..12),
            names("s", 12..14)
        ]
    );
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_everything_and_happens_once() {
    let exporter = TestExporter::default();
    let (record, provider, tracer) = batching(exporter, config(2048, 4, NEVER));

    end_spans(&tracer, "s", 0..6);
    shutdown(&provider).await.expect("shutdown");
    let mut exported: Vec<String> = record.batches().concat();
    exported.sort();
    assert_eq!(exported, names("s", 0..6));
    assert_eq!(record.shutdowns.load(Ordering::SeqCst), 1);

    assert!(
        matches!(
            shutdown(&provider).await,
            Err(OTelSdkError::AlreadyShutdown)
        ),
        "a second shutdown must fail"
    );
    end_spans(&tracer, "late", 0..10);
    assert!(flush(&provider).await.is_err(), "flush after shutdown");
    assert_eq!(
        record.exported(),
        6,
        "spans ended after shutdown were exported"
    );
    assert_eq!(record.shutdowns.load(Ordering::SeqCst), 1);
}

/// The same contract on the processor itself, without the provider's own shutdown flag in front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_shutdown_drains_and_rejects_what_follows() {
    let exporter = TestExporter::default();
    let record = exporter.record.clone();
    let batcher = Arc::new(SpanBatcher::new(exporter, config(2048, 4, NEVER)));

    for i in 0..6 {
        batcher.on_end(span_data(&format!("s{i}"), true));
    }
    let b = batcher.clone();
    blocking(move || b.shutdown()).await.expect("shutdown");
    assert_eq!(record.batches().concat(), names("s", 0..6));

    for i in 0..10 {
        batcher.on_end(span_data(&format!("late{i}"), true));
    }
    let b = batcher.clone();
    let (second, flushed) = blocking(move || (b.shutdown(), b.force_flush())).await;
    assert!(
        matches!(second, Err(OTelSdkError::AlreadyShutdown)),
        "second shutdown: {second:?}"
    );
    assert!(
        matches!(flushed, Err(OTelSdkError::AlreadyShutdown)),
        "flush after shutdown: {flushed:?}"
    );
    assert_eq!(
        record.exported(),
        6,
        "spans ended after shutdown were exported"
    );
    assert_eq!(record.shutdowns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_that_are_not_sampled_are_not_exported() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .with_span_processor(SpanBatcher::new(exporter.clone(), config(2048, 2, NEVER)))
        .build();
    let tracer = provider.tracer("t");

    end_spans(&tracer, "s", 0..10);
    flush(&provider).await.expect("flush");
    assert!(exporter.get_finished_spans().expect("spans").is_empty());
    shutdown(&provider).await.expect("shutdown");
}

/// Records every span but samples none: the processor sees each span end, unsampled.
#[derive(Debug, Clone)]
struct RecordOnly;

impl ShouldSample for RecordOnly {
    fn should_sample(
        &self,
        _parent_context: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        SamplingResult {
            decision: SamplingDecision::RecordOnly,
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_but_unsampled_spans_are_not_exported() {
    let exporter = TestExporter::default();
    let record = exporter.record.clone();
    let provider = SdkTracerProvider::builder()
        .with_sampler(RecordOnly)
        .with_span_processor(SpanBatcher::new(exporter, config(2048, 2, NEVER)))
        .build();
    let tracer = provider.tracer("t");

    end_spans(&tracer, "s", 0..10);
    flush(&provider).await.expect("flush");
    assert_eq!(record.calls(), 0, "exported {:?}", record.batches());
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_spans_do_not_fill_a_batch() {
    let exporter = TestExporter::default();
    let record = exporter.record.clone();
    let batcher = Arc::new(SpanBatcher::new(exporter, config(2048, 2, NEVER)));

    for i in 0..5 {
        batcher.on_end(span_data(&format!("unsampled{i}"), false));
    }
    batcher.on_end(span_data("sampled", true));
    let b = batcher.clone();
    blocking(move || b.force_flush()).await.expect("flush");
    assert_eq!(record.batches(), vec![vec!["sampled".to_owned()]]);
    let b = batcher.clone();
    blocking(move || b.shutdown()).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_exporter_makes_spans_drop_instead_of_blocking() {
    const QUEUE: usize = 8;
    const BATCH: usize = 4;
    const SPANS: usize = 102;
    // As `SpanBatcher::new` sizes its queue: the batch being filled counts against it.
    let queued_batches = (QUEUE / BATCH).saturating_sub(1).max(1);
    // One batch in the stuck export, the queued ones, and a partly filled one.
    let bound = BATCH + queued_batches * BATCH + (BATCH - 1);

    let (exporter, gate) = TestExporter::gated();
    let (record, provider, tracer) = batching(exporter, config(QUEUE, BATCH, NEVER));

    end_spans(&tracer, "s", 0..BATCH);
    wait_for("the first export to start", || record.calls() == 1).await;

    let ending = {
        let tracer = tracer.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            end_spans(&tracer, "s", BATCH..SPANS);
            started.elapsed()
        })
    };
    let took = tokio::time::timeout(DEADLINE, ending)
        .await
        .expect("ending spans blocked on the stuck exporter")
        .unwrap();
    assert!(took < Duration::from_secs(1), "ending spans took {took:?}");
    assert_eq!(record.calls(), 1, "the export task is still stuck");

    gate.close();
    flush(&provider).await.expect("flush");
    let exported = record.exported();
    assert!(
        exported <= bound && exported < SPANS,
        "exported {exported} of {SPANS}, bound {bound}"
    );
    // Exactly: the stuck batch, the one queued behind it, and the partial one.
    assert_eq!(
        record.batches(),
        vec![names("s", 0..4), names("s", 4..8), names("s", 100..102)]
    );

    // Once the exporter keeps up again, nothing more is dropped.
    end_spans(&tracer, "t", 0..BATCH);
    wait_for("an export after recovering", || record.sizes().len() == 4).await;
    assert_eq!(record.batches()[3], names("t", 0..4));
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_does_not_stop_later_ones() {
    let exporter = TestExporter {
        fail_calls: 1,
        ..TestExporter::default()
    };
    let (record, provider, tracer) = batching(exporter, config(2048, 4, NEVER));

    end_spans(&tracer, "s", 0..4);
    wait_for("the failed export", || record.failed() == 1).await;
    assert!(record.batches().is_empty());

    end_spans(&tracer, "s", 4..8);
    wait_for("the next export", || record.exported() >= 4).await;
    assert_eq!(record.batches(), vec![names("s", 4..8)]);
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_flush_reports_a_failed_export_and_the_next_one_recovers() {
    let exporter = TestExporter {
        fail_calls: 1,
        ..TestExporter::default()
    };
    let (record, provider, tracer) = batching(exporter, config(2048, 4, NEVER));

    end_spans(&tracer, "s", 0..2);
    assert!(flush(&provider).await.is_err(), "the export failed");
    assert_eq!(record.failed(), 1);

    end_spans(&tracer, "s", 2..4);
    flush(&provider).await.expect("flush after the failure");
    assert_eq!(record.batches(), vec![names("s", 2..4)]);
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_export_is_cut_off_by_the_export_timeout() {
    let exporter = TestExporter {
        hang_calls: 1,
        ..TestExporter::default()
    };
    let (record, provider, tracer) = batching(
        exporter,
        BatchConfig {
            export_timeout: Duration::from_millis(100),
            ..config(2048, 4, NEVER)
        },
    );

    end_spans(&tracer, "s", 0..4);
    wait_for("the first export to start", || record.calls() == 1).await;
    end_spans(&tracer, "s", 4..8);
    wait_for("the export after the hanging one", || {
        record.exported() >= 4
    })
    .await;
    assert_eq!(record.batches(), vec![names("s", 4..8)]);
    shutdown(&provider).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_resource_reaches_the_exporter() {
    let exporter = TestExporter::default();
    let record = exporter.record.clone();
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name("span-batch-test")
                .build(),
        )
        .with_span_processor(SpanBatcher::new(exporter, config(2048, 4, NEVER)))
        .build();

    // The resource is handed over before the flush, on the same channel.
    flush(&provider).await.expect("flush");
    assert_eq!(
        record.service_name.lock().unwrap().as_deref(),
        Some("span-batch-test")
    );
    shutdown(&provider).await.expect("shutdown");
}

/// `OTEL_BSP_SCHEDULE_DELAY=0` passes the configuration check and means "as soon as possible"
/// (`tokio::time::interval` would panic on a zero period and kill the export task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_schedule_delay_still_exports() {
    let exporter = TestExporter::default();
    let (record, provider, tracer) = batching(exporter, config(2048, 4, Duration::ZERO));

    // Without any flush: the full batch at once, the partial one on the next (immediate) tick.
    end_spans(&tracer, "s", 0..6);
    wait_for("all six spans without a flush", || record.exported() == 6).await;
    shutdown(&provider).await.expect("shutdown");
}

/// When every export succeeds within `export_timeout`, `force_flush` succeeds too: its budget
/// covers the export already running when the flush arrives, each queued batch and the partial
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_flush_allows_for_the_export_in_progress() {
    let exporter = TestExporter {
        latency: Duration::from_millis(900),
        ..TestExporter::default()
    };
    // One queued batch: the flush may wait 3 x 1 s (the running export, the queued batch and
    // the partial one).
    let (record, provider, tracer) = batching(
        exporter,
        BatchConfig {
            export_timeout: Duration::from_secs(1),
            ..config(8, 4, NEVER)
        },
    );

    end_spans(&tracer, "s", 0..4);
    wait_for("the first export to start", || record.calls() == 1).await;
    // One full batch queued behind it and two spans in the batch being filled: 3 x 0.9 s.
    end_spans(&tracer, "s", 4..10);
    let flushed = flush(&provider).await;
    assert!(flushed.is_ok(), "flush: {flushed:?}");
    assert_eq!(record.exported(), 10);
    shutdown(&provider).await.expect("shutdown");
}
