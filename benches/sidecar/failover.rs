//! Failover timings, each measured from the moment the fault is repaired (or the signal sent) to the
//! first message the app receives from the consumer that should take over:
//!
//! - `kill_9_standby`: kill -9 of the active sidecar under single active consumer → first message
//!   the standby delivers (the two sidecars POST to different paths, so the app tells them apart);
//! - `broker_restart`: `rabbitmqctl stop_app` / `start_app` → first message delivered after the
//!   broker accepts AMQP connections again (messages are published from that moment on);
//! - `app_restart`: the app stops listening for six outages of 1.1–3.4 s, none a whole number of
//!   500 ms probe intervals, then listens again → first message after each (median, all in the note);
//! - `sigterm`: SIGTERM while 16 messages are in the app (each takes 300 ms) → the process exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::rig::{self, App, Broker, QueueKind, SidecarProc};

#[derive(Debug, Clone)]
pub struct Timing {
    pub name: &'static str,
    pub what: &'static str,
    pub seconds: Option<f64>,
    pub target_s: Option<f64>,
    pub note: String,
}

fn sidecar_args(queue: &str, url: &str) -> Vec<String> {
    [
        "--queue",
        queue,
        "--target-url",
        url,
        "--prefetch",
        "128",
        "--concurrency",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A publisher that sends `rate` messages per second on its own connection until stopped.
struct Feeder {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Feeder {
    fn start(queue: &str, rate: f64) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (queue.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            // Reconnects, so it survives a broker restart; bounded by the stop flag and a count.
            for _ in 0..1000 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(b) = Broker::connect().await {
                    let _ = rig::publish_at_rate(&b.ch, &q, 1_000_000, 64, rate, &s).await;
                    let _ = b.conn.close(200, "".into()).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Feeder { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

pub async fn kill_9_standby(app: &App, kind: QueueKind) -> Result<Timing, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("sac");
    broker.declare(&q, kind, true).await;
    app.rec.reset();
    app.rec.track_paths.store(true, Ordering::Relaxed);
    let result = async {
        let mut active = SidecarProc::start(&sidecar_args(&q, &app.url("/active")), &[]).await?;
        let standby = SidecarProc::start(&sidecar_args(&q, &app.url("/standby")), &[]).await?;
        let feeder = Feeder::start(&q, 200.0);
        let warmed =
            rig::eventually(Duration::from_secs(20), || app.rec.hits_on("/active") >= 50).await;
        if !warmed || app.rec.hits_on("/standby") > 0 {
            feeder.stop().await;
            return Err("the first sidecar did not become the single active consumer".into());
        }
        let t0 = Instant::now();
        let _ = active.child.kill();
        let _ = active.wait_exit(Duration::from_secs(10)).await;
        let took = wait_first(app, "/standby", t0, Duration::from_secs(30)).await;
        feeder.stop().await;
        drop(standby);
        Ok(Timing {
            name: "kill_9_standby",
            what: "kill -9 of the active consumer → first message from the standby",
            seconds: took,
            target_s: Some(1.0),
            note: String::new(),
        })
    }
    .await;
    app.rec.track_paths.store(false, Ordering::Relaxed);
    broker.cleanup().await;
    result
}

/// Outages of the app, in seconds, for [`app_restart`]: none a whole number of 500 ms probe
/// intervals (the default `--app-probe-interval`), their remainders spread over the interval, so
/// the app comes back at different points of the probe's cycle. A single 3 s outage always came
/// back just after a probe and measured only the best case.
const APP_OUTAGES_S: [f64; 6] = [1.13, 1.37, 1.71, 2.21, 2.64, 3.42];

pub async fn app_restart(app: &mut App, kind: QueueKind) -> Result<Timing, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("appdown");
    broker.declare(&q, kind, false).await;
    app.rec.reset();
    app.rec.track_paths.store(true, Ordering::Relaxed);
    let result = async {
        let sidecar = SidecarProc::start(&sidecar_args(&q, &app.url("/app")), &[]).await?;
        let feeder = Feeder::start(&q, 200.0);
        let mut took = Vec::with_capacity(APP_OUTAGES_S.len());
        for outage in APP_OUTAGES_S {
            let flowing = app.rec.hits_on("/app") + 50;
            rig::eventually(Duration::from_secs(20), || app.rec.hits_on("/app") >= flowing).await;
            app.down();
            tokio::time::sleep(Duration::from_secs_f64(outage)).await;
            app.up().await;
            let t0 = Instant::now();
            match wait_first(app, "/app", t0, Duration::from_secs(30)).await {
                Some(s) => took.push(s),
                None => break,
            }
        }
        feeder.stop().await;
        drop(sidecar);
        let complete = took.len() == APP_OUTAGES_S.len();
        let mut sorted = took.clone();
        sorted.sort_by(f64::total_cmp);
        let median = complete.then(|| sorted[sorted.len() / 2]);
        let ms: Vec<String> = took.iter().map(|s| format!("{:.0}", s * 1000.0)).collect();
        Ok(Timing {
            name: "app_restart",
            what: "app down 1.1–3.4 s (six outages off the probe grid), then up → first message after it listens again (median)",
            seconds: median,
            target_s: Some(1.0),
            note: format!(
                "default --app-probe-interval 500ms; outages {APP_OUTAGES_S:?} s → {} ms{}",
                ms.join(", "),
                match (sorted.first(), sorted.last()) {
                    (Some(min), Some(max)) if complete =>
                        format!(" (min {:.0}, max {:.0})", min * 1000.0, max * 1000.0),
                    _ => " (the app was not reached after an outage)".to_string(),
                }
            ),
        })
    }
    .await;
    app.rec.track_paths.store(false, Ordering::Relaxed);
    broker.cleanup().await;
    result
}

/// Puts the broker app back if a scenario stopped it and then failed.
struct StartAppOnDrop(bool);

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        if self.0 {
            let _ = rig::rabbitmqctl(&["start_app"]);
        }
    }
}

/// Stops the broker only when no other client is connected (it is shared with whoever else works
/// on this machine), unless `force`.
pub async fn broker_restart(app: &App, kind: QueueKind, force: bool) -> Result<Timing, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("brk");
    broker.declare(&q, kind, false).await;
    app.rec.reset();
    app.rec.track_paths.store(true, Ordering::Relaxed);
    let result = async {
        let sidecar = SidecarProc::start(&sidecar_args(&q, &app.url("/brk")), &[]).await?;
        broker.publish_n(&q, 20, 64).await?;
        rig::eventually(Duration::from_secs(20), || app.rec.hits_on("/brk") >= 20).await;
        let sidecar_name = format!("pid {}", sidecar.pid());
        let others: Vec<String> = rig::broker_clients()?
            .into_iter()
            .filter(|c| !c.contains(rig::CONNECTION_NAME) && !c.contains(&sidecar_name))
            .collect();
        if !others.is_empty() && !force {
            return Ok(Timing {
                name: "broker_restart",
                what: "broker stop_app/start_app → first message after it accepts connections",
                seconds: None,
                target_s: Some(2.0),
                note: format!(
                    "skipped: {} other client(s) connected to the shared broker (--broker-restart=always to run anyway)",
                    others.len()
                ),
            });
        }
        let mut guard = StartAppOnDrop(true);
        rig::rabbitmqctl(&["stop_app"])?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        rig::rabbitmqctl(&["start_app"])?;
        guard.0 = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        let t0 = loop {
            if let Ok(c) = rig::connect().await {
                let t = Instant::now();
                let _ = c.close(200, "".into()).await;
                break t;
            }
            if Instant::now() > deadline {
                return Err("the broker did not accept connections within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let feeder = Feeder::start(&q, 200.0);
        let took = wait_first(app, "/brk", t0, Duration::from_secs(60)).await;
        feeder.stop().await;
        drop(sidecar);
        Ok(Timing {
            name: "broker_restart",
            what: "broker stop_app/start_app → first message after it accepts connections",
            seconds: took,
            target_s: Some(2.0),
            note: "default --reconnect-backoff 200ms, --reconnect-backoff-max 1s".into(),
        })
    }
    .await;
    app.rec.track_paths.store(false, Ordering::Relaxed);
    // The rig's own connection died with the broker app: delete over a fresh one.
    rig::delete_queues(&broker.forget()).await;
    result
}

pub async fn sigterm(app: &App, kind: QueueKind) -> Result<Timing, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("term");
    broker.declare(&q, kind, false).await;
    app.rec.reset();
    let result = async {
        let mut sidecar = SidecarProc::start(&sidecar_args(&q, &app.url("/term")), &[]).await?;
        app.set_delay(Duration::from_millis(300));
        broker.publish_n(&q, 64, 64).await?;
        rig::eventually(Duration::from_secs(20), || app.rec.count() >= 16).await;
        let t0 = Instant::now();
        sidecar.signal("TERM");
        let exit = sidecar.wait_exit(Duration::from_secs(40)).await;
        let took = exit.map(|_| t0.elapsed().as_secs_f64());
        app.set_delay(Duration::ZERO);
        Ok(Timing {
            name: "sigterm",
            what: "SIGTERM with 16 messages in flight (300 ms each) → process exit",
            seconds: took,
            target_s: None,
            note: match exit {
                Some(s) => format!("exit status {}", s.code().unwrap_or(-1)),
                None => "did not exit within 40 s".into(),
            },
        })
    }
    .await;
    app.set_delay(Duration::ZERO);
    broker.cleanup().await;
    result
}

async fn wait_first(app: &App, path: &str, t0: Instant, timeout: Duration) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(at) = app.rec.first_hit(path, t0) {
            return Some(at.duration_since(t0).as_secs_f64());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
