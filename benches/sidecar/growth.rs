//! How the sidecar's cost grows with the work, one axis at a time: subscriptions in one sidecar
//! (idle and busy), body size (throughput in MiB/s against baseline 2, bare lapin + POST), and
//! prefetch. For each point: CPU seconds per 10,000 messages (CPU per second when idle), peak RSS
//! and open file descriptors of the consumer process. Something that grows faster than the work
//! is a finding.
//!
//! `cargo bench --bench sidecar -- --growth [--quick]`: the quick mode takes fewer points and
//! messages, to prove the mode works; its figures are not for the docs.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::baseline::BareProc;
use crate::rig::{self, App, Broker, ProcStats, QueueKind, SidecarProc};

/// One measured point.
struct Point {
    axis: &'static str,
    value: String,
    consumer: &'static str,
    messages: usize,
    msgs_per_s: Option<f64>,
    mib_per_s: Option<f64>,
    cpu_s_per_10k: Option<f64>,
    idle_cpu_pct: Option<f64>,
    rss_mib: f64,
    fds: usize,
}

/// The consumer process under test.
enum Proc {
    Sidecar(SidecarProc),
    Bare(BareProc),
}

impl Proc {
    fn stats(&self) -> ProcStats {
        match self {
            Proc::Sidecar(s) => s.stats(),
            Proc::Bare(b) => b.stats(),
        }
    }
}

/// Waits until the app has `n` receipts (at most `timeout`) and returns the busy figures: msg/s
/// from the first receipt to the last, MiB/s of bodies of `size`, CPU s per 10k messages between
/// `before` and the end.
async fn drained(
    app: &App,
    proc: &Proc,
    before: ProcStats,
    n: usize,
    size: usize,
    timeout: Duration,
) -> Result<(f64, f64, f64), String> {
    let deadline = Instant::now() + timeout;
    while app.rec.count() < n as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} messages drained within {timeout:?}",
                app.rec.count()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = proc.stats();
    let span = app.rec.span().unwrap_or_default().as_secs_f64().max(1e-3);
    let rate = n as f64 / span;
    Ok((
        rate,
        rate * size as f64 / (1024.0 * 1024.0),
        (after.cpu_s - before.cpu_s) * 10_000.0 / n as f64,
    ))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `count` subscriptions in one sidecar (a configuration file with one `[[subscription]]` each):
/// idle for a few seconds, then `messages` spread evenly over the queues.
async fn subscriptions(
    app: &App,
    kind: QueueKind,
    count: usize,
    messages: usize,
) -> Result<Point, String> {
    let broker = Broker::connect().await?;
    let queues: Vec<String> = (0..count).map(|_| rig::unique("grow")).collect();
    for q in &queues {
        broker.declare(q, kind, false).await;
    }
    let result = async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut config = format!(
            "target-url = \"{}\"\nprefetch = 16\nconcurrency = 4\n",
            app.url("/grow")
        );
        for q in &queues {
            config.push_str(&format!("[[subscription]]\nqueue = \"{q}\"\n"));
        }
        let file = dir.path().join("sidecar.toml");
        std::fs::write(&file, config).map_err(|e| e.to_string())?;
        let sidecar = SidecarProc::start(&["--config".into(), file.display().to_string()], &[])
            .await
            .map(Proc::Sidecar)?;
        let idle = Duration::from_secs(5);
        let start = sidecar.stats();
        tokio::time::sleep(idle).await;
        let idle_end = sidecar.stats();
        let idle_cpu_pct = (idle_end.cpu_s - start.cpu_s) / idle.as_secs_f64() * 100.0;
        app.rec.reset();
        let per_queue = messages / count;
        for q in &queues {
            broker.publish_n(q, per_queue, 256).await?;
        }
        let n = per_queue * count;
        let (rate, _, cpu) =
            drained(app, &sidecar, idle_end, n, 256, Duration::from_secs(120)).await?;
        let end = sidecar.stats();
        Ok(Point {
            axis: "subscriptions",
            value: count.to_string(),
            consumer: "sidecar",
            messages: n,
            msgs_per_s: Some(rate),
            mib_per_s: None,
            cpu_s_per_10k: Some(cpu),
            idle_cpu_pct: Some(idle_cpu_pct),
            rss_mib: mib(end.hwm_kib),
            fds: end.fds,
        })
    }
    .await;
    broker.cleanup().await;
    result
}

/// One queue drained by the sidecar or by baseline 2 at concurrency 16, `messages` of `size`
/// bytes, with `prefetch`.
async fn drain_one(
    app: &App,
    kind: QueueKind,
    axis: &'static str,
    sidecar: bool,
    size: usize,
    prefetch: u16,
    messages: usize,
) -> Result<Point, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("grow");
    broker.declare(&q, kind, false).await;
    let result = async {
        app.rec.reset();
        broker.publish_n(&q, messages, size).await?;
        let url = app.url("/grow");
        let proc = if sidecar {
            let args: Vec<String> = [
                "--queue",
                &q,
                "--target-url",
                &url,
                "--prefetch",
                &prefetch.to_string(),
                "--concurrency",
                "16",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Proc::Sidecar(SidecarProc::start(&args, &[]).await?)
        } else {
            Proc::Bare(BareProc::start(&q, &url, 16, prefetch).await?)
        };
        let before = proc.stats();
        let (rate, mibs, cpu) =
            drained(app, &proc, before, messages, size, Duration::from_secs(300)).await?;
        let end = proc.stats();
        if let Proc::Bare(mut b) = proc {
            b.stop().await;
        }
        Ok(Point {
            axis,
            value: match axis {
                "prefetch" => prefetch.to_string(),
                _ if size >= 1 << 20 => format!("{} MiB", size >> 20),
                _ if size >= 1024 => format!("{} KiB", size >> 10),
                _ => format!("{size} B"),
            },
            consumer: if sidecar { "sidecar" } else { "baseline 2" },
            messages,
            msgs_per_s: Some(rate),
            mib_per_s: Some(mibs),
            cpu_s_per_10k: Some(cpu),
            idle_cpu_pct: None,
            rss_mib: mib(end.hwm_kib),
            fds: end.fds,
        })
    }
    .await;
    broker.cleanup().await;
    result
}

/// Runs every axis and prints one table; returns the points as JSON.
pub async fn run(app: &App, kind: QueueKind, quick: bool) -> Result<Value, String> {
    let mut points = Vec::new();
    let (subs, total): (&[usize], usize) = if quick {
        (&[1, 10], 1_000)
    } else {
        (&[1, 10, 100], 10_000)
    };
    for &count in subs {
        eprintln!("growth: {count} subscription(s) in one sidecar");
        points.push(subscriptions(app, kind, count, total).await?);
    }
    // Bodies: as many messages as keep each point's volume in bounds.
    let sizes: &[(usize, usize)] = if quick {
        &[(256, 1_000), (16 << 10, 500)]
    } else {
        &[(256, 10_000), (16 << 10, 5_000), (1 << 20, 300)]
    };
    for &(size, n) in sizes {
        for sidecar in [false, true] {
            eprintln!("growth: {size} B bodies, sidecar={sidecar}");
            points.push(drain_one(app, kind, "body size", sidecar, size, 128, n).await?);
        }
    }
    let prefetches: &[u16] = if quick { &[16, 128] } else { &[16, 128, 1000] };
    for &prefetch in prefetches {
        eprintln!("growth: prefetch {prefetch}");
        let n = if quick { 1_000 } else { 10_000 };
        points.push(drain_one(app, kind, "prefetch", true, 256, prefetch, n).await?);
    }
    print(&points);
    Ok(Value::Array(points.iter().map(point_json).collect()))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn print(points: &[Point]) {
    println!();
    println!(
        "| axis | value | consumer | messages | msg/s | MiB/s | CPU s / 10k | idle CPU % | peak RSS MiB | fds |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            p.axis,
            p.value,
            p.consumer,
            p.messages,
            opt(p.msgs_per_s, 0),
            opt(p.mib_per_s, 1),
            opt(p.cpu_s_per_10k, 2),
            opt(p.idle_cpu_pct, 2),
            p.rss_mib,
            p.fds
        );
    }
}

fn point_json(p: &Point) -> Value {
    json!({
        "axis": p.axis,
        "value": p.value,
        "consumer": p.consumer,
        "messages": p.messages,
        "msgs_per_s": p.msgs_per_s,
        "mib_per_s": p.mib_per_s,
        "cpu_s_per_10k": p.cpu_s_per_10k,
        "idle_cpu_pct": p.idle_cpu_pct,
        "peak_rss_mib": p.rss_mib,
        "fds": p.fds,
    })
}
