//! Faults that disturb the shared broker: a seeded chaos run (kill -9 and restart sidecars, close
//! every sidecar connection, stop and start the broker application, take the app down and up)
//! over a classic and a quorum queue, and a memory alarm that blocks publishing while dead letters
//! wait to be published. These run in the second, serial pass (`binary(/^disruptive/)`).
//!
//! `RABBIT_SIDECAR_CHAOS=long` runs the long chaos version; `RABBIT_SIDECAR_CHAOS_SEED=<n>`
//! replays a schedule. See `docs/chaos.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Starts the broker application again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command().arg("start_app").output();
        let _ = rabbitmqctl_command()
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

/// How soon the broker tries again a dead-letter hop it could not make (the test's setting).
const DLX_RETRY: Duration = Duration::from_secs(5);

/// Sets the broker's `dead_letter_worker_publisher_confirm_timeout` to [`DLX_RETRY`] and puts the
/// previous value back when dropped. Workers read it when they start: a restart after this picks it
/// up.
struct DlxRetryInterval(String);

impl DlxRetryInterval {
    const KEY: &str = "dead_letter_worker_publisher_confirm_timeout";

    fn shorten() -> Self {
        let previous = rabbitmqctl(&[
            "eval",
            &format!("{{ok, V}} = application:get_env(rabbit, {}), V.", Self::KEY),
        ])
        .trim()
        .to_owned();
        assert!(
            previous.parse::<u64>().is_ok(),
            "{} is not a number of milliseconds: {previous}",
            Self::KEY
        );
        rabbitmqctl(&["eval", &Self::set(&DLX_RETRY.as_millis().to_string())]);
        Self(previous)
    }

    fn set(millis: &str) -> String {
        format!("application:set_env(rabbit, {}, {millis}).", Self::KEY)
    }
}

impl Drop for DlxRetryInterval {
    fn drop(&mut self) {
        // No assertion here: a drop while a failed test unwinds must not panic again.
        let _ = rabbitmqctl_command()
            .args(["eval", &Self::set(&self.0)])
            .output();
    }
}

struct Plan {
    long: bool,
    messages: usize,
    app_delay: Duration,
    max_faults: usize,
    /// Per mille of requests answered 503.
    fail_per_mille: u64,
    /// One id in this many is poison (always 400): the only dead letters expected.
    poison_every: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let long = std::env::var("RABBIT_SIDECAR_CHAOS").as_deref() == Ok("long");
        if long {
            Plan {
                long,
                messages: 30_000,
                app_delay: Duration::from_millis(30),
                max_faults: 60,
                fail_per_mille: 30,
                poison_every: 200,
            }
        } else {
            Plan {
                long,
                messages: 3_000,
                app_delay: Duration::from_millis(100),
                max_faults: 12,
                fail_per_mille: 30,
                poison_every: 200,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Kill9Sidecar,
    CloseConnections,
    BrokerRestart,
    AppDownUp,
}

fn seed() -> u64 {
    std::env::var("RABBIT_SIDECAR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn spawn_sidecar(queue: &str, app: &str) -> Sidecar {
    Sidecar::spawn(&[
        "--amqp-url",
        amqp(),
        "--queue",
        queue,
        "--target-url",
        app,
        "--prefetch",
        "20",
        "--concurrency",
        "4",
        "--max-deliveries",
        "1000",
        "--retry-backoff",
        "50ms",
        "--retry-backoff-max",
        "500ms",
        "--heartbeat",
        "2s",
        "--reconnect-backoff",
        "100ms",
        "--reconnect-backoff-max",
        "1s",
        "--app-probe-interval",
        "200ms",
        "--queue-poll-interval",
        "1s",
        "--shutdown-grace",
        "5s",
    ])
}

async fn publish_all(broker: &Broker, queue: &str, ids: &[String]) {
    for chunk in ids.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for id in chunk {
            confirms.push(
                broker
                    .ch
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        id.as_bytes(),
                        BasicProperties::default()
                            .with_message_id(id.as_str().into())
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
}

fn tail(s: &str) -> String {
    let start = s.len().saturating_sub(6000);
    String::from_utf8_lossy(&s.as_bytes()[start..]).into_owned()
}

fn h(seed: u64, id: &str, n: u32) -> u64 {
    let mut s = std::collections::hash_map::DefaultHasher::new();
    (seed, id, n).hash(&mut s);
    s.finish()
}

async fn chaos(quorum: bool) {
    let plan = Plan::from_env();
    let seed = seed();
    let kind = if quorum { "quorum" } else { "classic" };
    println!(
        "chaos: {kind} queue, {} mode, seed {seed} (replay with RABBIT_SIDECAR_CHAOS_SEED={seed})",
        if plan.long { "long" } else { "quick" }
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut broker = Broker::connect().await;
    let queue = unique(&format!("chaos-{kind}"));
    broker.declare(&queue, quorum, false).await;

    let ids: Vec<String> = (0..plan.messages)
        .map(|i| {
            if i % plan.poison_every == plan.poison_every - 1 {
                format!("poison-{i}")
            } else {
                format!("m-{i}")
            }
        })
        .collect();
    let poison: HashSet<String> = ids
        .iter()
        .filter(|i| i.starts_with("poison"))
        .cloned()
        .collect();
    publish_all(&broker, &queue, &ids).await;

    // The app: 400 for poison, 503 for a seeded few per mille of requests, else 200 (recorded).
    let mut app = App::start().await;
    app.set_delay(plan.app_delay);
    let accepted: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let requests: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let injected_5xx = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    {
        let (accepted, requests, injected_5xx, redelivered) = (
            accepted.clone(),
            requests.clone(),
            injected_5xx.clone(),
            redelivered.clone(),
        );
        let per_mille = plan.fail_per_mille;
        app.answer(move |r| {
            let id = r.id();
            if r.header("x-amqp-redelivered") == Some("true") {
                redelivered.fetch_add(1, Ordering::Relaxed);
            }
            if id.starts_with("poison") {
                return 400;
            }
            let n = {
                let mut req = requests.lock().unwrap();
                let n = req.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            if h(seed, &id, n) % 1000 < per_mille {
                injected_5xx.fetch_add(1, Ordering::Relaxed);
                return 503;
            }
            *accepted.lock().unwrap().entry(id).or_default() += 1;
            200
        });
    }
    let url = app.url();
    let started = Instant::now();
    let mut sidecars: Vec<Sidecar> = (0..3).map(|_| spawn_sidecar(&queue, &url)).collect();
    // Faults each sidecar lived through while connected: (connection faults, app outages).
    let mut lived: Vec<(u32, u32)> = vec![(0, 0); 3];
    for s in &sidecars {
        s.wait_ready(Duration::from_secs(30)).await;
    }
    let good = ids.len() - poison.len();
    let all_accepted = || {
        let a = accepted.lock().unwrap();
        a.len() == good
    };

    let mut schedule: Vec<(Duration, Fault, String)> = Vec::new();
    let mut counts: BTreeMap<Fault, u32> = BTreeMap::new();
    let faults: Vec<Fault> = [
        Fault::Kill9Sidecar,
        Fault::CloseConnections,
        Fault::BrokerRestart,
        Fault::AppDownUp,
    ]
    .into_iter()
    .collect();
    let mut first = faults.clone();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.random_range(0..=i));
    }
    while schedule.len() < plan.max_faults && !all_accepted() {
        let wait = Duration::from_millis(rng.random_range(800..2500));
        let deadline = Instant::now() + wait;
        // Wait out the gap, but stop early once everything is in.
        while Instant::now() < deadline && !all_accepted() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if all_accepted() {
            break;
        }
        // The first four faults are each kind once, in a seeded order; then any kind.
        let fault = if schedule.len() < faults.len() {
            first[schedule.len()]
        } else {
            faults[rng.random_range(0..faults.len())]
        };
        let at = started.elapsed();
        let detail = match fault {
            Fault::Kill9Sidecar => {
                let i = rng.random_range(0..sidecars.len());
                let pid = sidecars[i].pid();
                sidecars[i].kill9().await;
                sidecars[i] = spawn_sidecar(&queue, &url);
                lived[i] = (0, 0);
                format!("sidecar {i} (pid {pid}) killed and restarted")
            }
            Fault::CloseConnections => {
                for (i, s) in sidecars.iter().enumerate() {
                    if s.metric("rabbit_sidecar_connection_up").await == 1.0 {
                        lived[i].0 += 1;
                    }
                }
                // The sidecars name their connections "rabbit-sidecar <host> pid <n>"; the test's own is
                // "rabbit-sidecar-tests" and stays.
                let n = close_connections_named("rabbit-sidecar ");
                format!("{n} sidecar connections closed")
            }
            Fault::BrokerRestart => {
                for (i, s) in sidecars.iter().enumerate() {
                    if s.metric("rabbit_sidecar_connection_up").await == 1.0 {
                        lived[i].0 += 1;
                    }
                }
                let down = Duration::from_millis(rng.random_range(500..3000));
                let guard = RestartGuard;
                rabbitmqctl(&["stop_app"]);
                tokio::time::sleep(down).await;
                drop(guard);
                broker = Broker::connect().await;
                broker.track(&queue);
                format!("broker app stopped for {down:?} (plus boot)")
            }
            Fault::AppDownUp => {
                let down = Duration::from_millis(rng.random_range(300..2000));
                app.down();
                tokio::time::sleep(down).await;
                app.up().await;
                format!("app down for {down:?}")
            }
        };
        println!("  t={:>6.1}s  {fault:?}: {detail}", at.as_secs_f64());
        *counts.entry(fault).or_default() += 1;
        schedule.push((at, fault, detail));
    }
    let faults_done = started.elapsed();
    // Every kind of fault happened at least once: a run that drained before the fourth fault
    // proved nothing about the kinds it never reached.
    for fault in &faults {
        assert!(
            counts.get(fault).is_some_and(|n| *n >= 1),
            "{fault:?} was never injected (faults: {counts:?}); more messages are needed"
        );
    }

    // Healed: the broker and the app are up, three sidecars run. Everything must drain.
    let drain_limit = if plan.long {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(150)
    };
    let dead_queue = format!("{queue}.dead-letter");
    let drained = eventually(drain_limit, || async {
        all_accepted()
            && broker.count(&queue).await.map(|c| c.0) == Some(0)
            && broker.count(&format!("{queue}.retry")).await.map(|c| c.0) == Some(0)
            && broker.count(&dead_queue).await.map(|c| c.0) >= Some(poison.len() as u32)
    })
    .await;
    let drain_time = started.elapsed();
    let missing: Vec<String> = {
        let a = accepted.lock().unwrap();
        ids.iter()
            .filter(|i| !poison.contains(*i) && !a.contains_key(*i))
            .take(20)
            .cloned()
            .collect()
    };
    assert!(
        drained,
        "seed {seed}: not drained within {drain_limit:?}; missing (first 20): {missing:?}; queue {:?}; logs of sidecar 0:\n{}",
        broker.count(&queue).await,
        tail(&sidecars[0].logs())
    );

    // Settled everywhere, and the survivors' metrics say what happened to them.
    for (i, s) in sidecars.iter().enumerate() {
        let qlabel = format!("queue=\"{queue}\"");
        // The last fault may be seconds old: give a reconnect time to finish.
        let consumer_up = format!("rabbit_sidecar_consumer_up{{{qlabel}}}");
        let in_flight = format!("rabbit_sidecar_in_flight_messages{{{qlabel}}}");
        let back = eventually(Duration::from_secs(30), || async {
            let m = s.metrics().await;
            metric_value(&m, "rabbit_sidecar_connection_up") == Some(1.0)
                && metric_value(&m, &consumer_up) == Some(1.0)
                && metric_value(&m, "rabbit_sidecar_ready") == Some(1.0)
                && metric_value(&m, &in_flight) == Some(0.0)
        })
        .await;
        assert!(
            back,
            "seed {seed}: sidecar {i} is not connected, consuming, ready and idle: in flight {}; {:?}\n{}",
            s.metric(&in_flight).await,
            s.get("/status").await,
            tail(&s.logs())
        );
        let m = s.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                &format!("rabbit_sidecar_dead_letters_total{{{qlabel},reason=\"max_deliveries\"}}")
            ),
            Some(0.0),
            "sidecar {i}: nothing dead-lettered for attempts"
        );
        if lived[i].0 > 0 {
            assert!(
                metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap() >= 1.0,
                "sidecar {i} lived through {} connection faults: {m}",
                lived[i].0
            );
        }
    }

    let letters = broker.drain(&dead_queue).await;
    let dead_ids: Vec<String> = letters
        .iter()
        .map(|(b, _)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let dead_set: HashSet<String> = dead_ids.iter().cloned().collect();
    assert_eq!(
        dead_set, poison,
        "seed {seed}: only the poison is dead-lettered"
    );
    for (_, p) in &letters {
        assert_eq!(
            header_str(p, "x-sidecar-dead-letter-reason").as_deref(),
            Some("rejected")
        );
    }

    let accepted = accepted.lock().unwrap().clone();
    let duplicates: u32 = accepted.values().map(|n| n - 1).sum();
    let dup_ids = accepted.values().filter(|n| **n > 1).count();
    println!("chaos report ({kind} queue, seed {seed}):");
    println!(
        "  messages           {} ({} poison)",
        ids.len(),
        poison.len()
    );
    println!(
        "  faults injected    {} in {:.1}s: {counts:?}",
        schedule.len(),
        faults_done.as_secs_f64()
    );
    println!(
        "  5xx injected       {}",
        injected_5xx.load(Ordering::Relaxed)
    );
    println!(
        "  accepted           {} ids, every one at least once",
        accepted.len()
    );
    println!(
        "  duplicates         {duplicates} extra 2xx over {dup_ids} ids (a 2xx whose ack died with its connection or sidecar is redelivered: at-least-once)"
    );
    println!(
        "  redelivered        {} requests carried X-Amqp-Redelivered: true",
        redelivered.load(Ordering::Relaxed)
    );
    println!(
        "  dead letters       {} ({} distinct, all poison; extra copies when a sidecar died between the dead-letter confirm and the ack)",
        dead_ids.len(),
        dead_set.len()
    );
    println!("  time to drain      {:.1}s", drain_time.as_secs_f64());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_classic_every_id_accepted_nothing_unexpected_dead_lettered() {
    chaos(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_quorum_every_id_accepted_nothing_unexpected_dead_lettered() {
    chaos(true).await;
}

/// Puts the memory high watermark back (and so clears the alarm), also when the test fails.
struct WatermarkGuard(String);

impl WatermarkGuard {
    fn raise_alarm() -> WatermarkGuard {
        let env = rabbitmqctl(&["environment"]);
        let original = env
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("{vm_memory_high_watermark,")
                    .and_then(|v| v.strip_suffix("},").or(v.strip_suffix('}')))
                    .filter(|v| v.parse::<f64>().is_ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "0.4".into());
        let guard = WatermarkGuard(original);
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
        guard
    }
}

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

/// (messages, ready) of `queue` as the broker counts them: `messages` includes the unacked.
fn queue_messages(queue: &str) -> Option<(u64, u64)> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
        "messages_ready",
    ]);
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 3 && f[0] == queue {
            Some((f[1].parse().ok()?, f[2].parse().ok()?))
        } else {
            None
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_holds_dead_letters_until_it_clears_and_loses_none() {
    let broker = Broker::connect().await;
    let queue = unique("alarm");
    broker.declare(&queue, false, false).await;
    let ids = broker.publish_n(&queue, 10, "alarm").await;
    let app = App::start().await;
    app.answer(|_| 400);
    let url = app.url();

    let alarm = WatermarkGuard::raise_alarm();
    let sidecar = Sidecar::start(&[
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--heartbeat",
        "2s",
        "--retry-backoff",
        "200ms",
        "--retry-backoff-max",
        "1s",
    ]);
    assert!(
        sidecar
            .wait_metric(
                "rabbit_sidecar_connection_blocked",
                1.0,
                Duration::from_secs(30)
            )
            .await,
        "the sidecar sees the alarm block its publishing; logs:\n{}",
        tail(&sidecar.logs())
    );
    assert!(
        eventually(Duration::from_secs(10), || async { app.count() >= 1 }).await,
        "a poison message reached the app"
    );
    let q = format!("queue=\"{queue}\"");
    let dead_queue = format!("{queue}.dead-letter");
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_dead_letters_total{{{q},reason=\"rejected\"}}")
        ),
        Some(0.0),
        "no dead letter is confirmed while publishing is blocked"
    );
    assert_eq!(
        queue_messages(&dead_queue).map(|m| m.0),
        Some(0),
        "nothing landed in the dead-letter queue during the alarm"
    );
    assert_eq!(
        queue_messages(&queue).map(|m| m.0),
        Some(10),
        "the originals stay in the queue (unacked or requeued) during the alarm"
    );
    let status = sidecar.get("/status").await.unwrap().1;
    assert!(status.contains("\"blocked\": true"), "{status}");
    // Held past the 30 s confirm timeout: the copies are given up on and counted, their
    // originals held for a backoff step and requeued, and nothing is lost.
    let failures = format!("rabbit_sidecar_dead_letter_failures_total{{{q}}}");
    assert!(
        eventually(Duration::from_secs(60), || async {
            sidecar.metric(&failures).await >= 1.0
        })
        .await,
        "an unconfirmed dead letter is counted once the confirm timeout passes; logs:\n{}",
        tail(&sidecar.logs())
    );
    assert_eq!(
        queue_messages(&queue).map(|m| m.0),
        Some(10),
        "the originals are still in the queue (held, then requeued)"
    );

    drop(alarm);
    assert!(
        eventually(Duration::from_secs(90), || async {
            queue_messages(&dead_queue).map(|m| m.0) >= Some(10)
                && queue_messages(&queue).map(|m| m.0) == Some(0)
        })
        .await,
        "after the alarm the dead letters land; logs:\n{}",
        tail(&sidecar.logs())
    );
    assert!(
        sidecar
            .wait_metric(
                "rabbit_sidecar_connection_blocked",
                0.0,
                Duration::from_secs(10)
            )
            .await
    );
    let m = sidecar.metrics().await;
    assert!(
        metric_value(
            &m,
            &format!("rabbit_sidecar_dead_letters_total{{{q},reason=\"rejected\"}}")
        )
        .unwrap()
            >= 10.0,
        "{m}"
    );
    let letters: HashSet<String> = broker
        .drain(&dead_queue)
        .await
        .into_iter()
        .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
        .collect();
    assert_eq!(letters, ids.into_iter().collect::<HashSet<_>>());
    println!(
        "alarm: dead-letter publish failures while blocked: {}",
        metric_value(
            &m,
            &format!("rabbit_sidecar_dead_letter_failures_total{{{q}}}")
        )
        .unwrap_or(f64::NAN)
    );
    broker.cleanup().await;
}

/// Retry copies that are due while the broker restarts. RabbitMQ dead-letters from classic queues
/// at most once: with a classic retry queue, a copy that expired at boot, before the consumed
/// quorum queue had a leader again, was dropped (200 of 200 here). The retry queue is now a
/// quorum queue with at-least-once dead-lettering, and this test holds it to that.
///
/// At-least-once keeps such a copy in the retry queue (counted in `messages`, not ready) and the
/// broker tries the hop again after `dead_letter_worker_publisher_confirm_timeout`, 180 s by
/// default: that happened in CI (`messages` 200, ready 0, a minute after the restart). The test
/// shortens that setting to [`DLX_RETRY`] for its run so that it can wait for the second try
/// (README, "Failure semantics", says what users see with the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copies_due_during_a_broker_restart_come_back_quorum() {
    retry_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copies_due_during_a_broker_restart_come_back_classic() {
    retry_restart(false).await;
}

async fn retry_restart(quorum: bool) {
    let broker = Broker::connect().await;
    let queue = unique("retry-restart");
    broker.declare(&queue, quorum, false).await;
    let app = App::start().await;
    app.answer(|r| {
        if r.header("x-amqp-attempt") == Some("1") {
            503
        } else {
            200
        }
    });
    let url = app.url();
    let sidecar = Sidecar::start(&[
        "--amqp-url",
        amqp(),
        "--queue",
        &queue,
        "--target-url",
        &url,
        "--heartbeat",
        "2s",
        "--retry-backoff",
        "8s",
        "--retry-backoff-max",
        "8s",
        "--reconnect-backoff",
        "100ms",
        "--reconnect-backoff-max",
        "1s",
        // Every first attempt fails on purpose: with the breaker on, the open circuit would
        // park most of them before the app saw them (tests/broker/circuit_breaker.rs covers that).
        "--circuit-breaker=false",
    ]);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let ids = broker.publish_n(&queue, 200, "rr").await;
    let retry = format!("{queue}.retry");
    assert!(
        eventually(Duration::from_secs(30), || async {
            queue_messages(&retry).map(|m| m.0) == Some(200)
        })
        .await,
        "every first attempt failed into the retry queue: retry queue {:?}, app saw {}; logs:\n{}",
        queue_messages(&retry),
        app.count(),
        sidecar
            .logs()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let parked = Instant::now();
    let _retry_hop = DlxRetryInterval::shorten();
    let guard = RestartGuard;
    rabbitmqctl(&["stop_app"]);
    // Stay down until the copies are overdue (a fault schedule, not a synchronisation).
    tokio::time::sleep(
        (parked + Duration::from_secs(10)).saturating_duration_since(Instant::now()),
    )
    .await;
    drop(guard);
    let broker = Broker::connect().await;
    broker.track(&queue);
    let want: HashSet<String> = ids.into_iter().collect();
    let done = eventually(Duration::from_secs(60), || async {
        let got: HashSet<String> = app
            .received()
            .iter()
            .filter(|r| r.header("x-amqp-attempt") != Some("1"))
            .map(|r| r.id())
            .collect();
        want.is_subset(&got)
    })
    .await;
    let got: HashSet<String> = app
        .received()
        .iter()
        .filter(|r| r.header("x-amqp-attempt") != Some("1"))
        .map(|r| r.id())
        .collect();
    let missing = want.difference(&got).count();
    println!(
        "retry copies after the restart: {} of 200 came back; queue {:?}, retry queue {:?}",
        200 - missing,
        queue_messages(&queue),
        queue_messages(&retry)
    );
    broker.cleanup().await;
    assert!(
        done,
        "{missing} of 200 retry copies were lost across the restart"
    );
}
