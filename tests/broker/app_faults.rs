//! The app misbehaving, against a raw TCP HTTP server the test controls byte by byte: it hangs
//! forever on some messages, answers slowly, closes the connection after reading the request, or
//! answers 2xx with a huge body. The sidecar keeps its promises in each case: a hang is cut by the
//! handler timeout and retried, then dead-lettered; a closed connection is a `connection_reset`
//! retry, bounded the same way (never a loop); a slow answer within the timeout is an ack; a huge
//! 2xx body is acked without being read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Seen {
    /// Requests per message id.
    attempts: HashMap<String, u32>,
    /// Bytes of huge bodies written before the sidecar went away.
    huge_written: Vec<u64>,
}

const HUGE: u64 = 1 << 30;

/// Serves requests on one connection (keep-alive) according to the body's prefix.
async fn serve(mut s: TcpStream, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    loop {
        // Read one request: head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let id = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
        buf.drain(..head_end + len);
        *seen.lock().unwrap().attempts.entry(id.clone()).or_default() += 1;
        let kind = id.split('-').next().unwrap_or("");
        match kind {
            "hang" => {
                // Never answer; hold the connection until the sidecar gives up on it (bounded).
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(60), s.read(&mut sink)).await;
                return;
            }
            "close" => return,
            "slow" => tokio::time::sleep(Duration::from_millis(700)).await,
            "huge" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {HUGE}\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut written = 0u64;
                let deadline = Instant::now() + Duration::from_secs(20);
                while written < HUGE && Instant::now() < deadline {
                    match tokio::time::timeout(Duration::from_secs(5), s.write_all(&chunk)).await {
                        Ok(Ok(())) => written += chunk.len() as u64,
                        _ => break,
                    }
                }
                seen.lock().unwrap().huge_written.push(written);
                return;
            }
            _ => {}
        }
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

async fn raw_app(seen: Arc<Mutex<Seen>>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, seen.clone()));
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn hangs_resets_slow_answers_and_huge_bodies_each_keep_the_promise() {
    let broker = Broker::connect().await;
    let queue = unique("app-faults");
    broker.track(&queue);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (addr, server) = raw_app(seen.clone()).await;
    let url = format!("http://{addr}/");
    // The common fast flags (100ms retry backoff, 200ms app probe, ...) plus this test's own.
    let sidecar = Sidecar::start(&args(
        &queue,
        &url,
        &[
            "--handler-timeout",
            "1500ms",
            "--max-deliveries",
            "3",
            "--retry-backoff-max",
            "200ms",
        ],
    ));
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let mut ids = Vec::new();
    for kind in ["ok", "hang", "close", "slow", "huge"] {
        ids.extend(broker.publish_n(&queue, 3, kind).await);
    }
    let dead = format!("{queue}.dead-letter");
    assert!(
        eventually(Duration::from_secs(60), || async {
            broker.count(&dead).await.map(|c| c.0) == Some(6)
        })
        .await,
        "hang-* and close-* dead-lettered; logs:\n{}",
        sidecar.logs()
    );
    let q = format!("queue=\"{queue}\"");
    assert!(
        sidecar
            .wait_metric(
                &format!("rabbit_sidecar_acks_total{{{q}}}"),
                9.0,
                Duration::from_secs(30)
            )
            .await,
        "ok-*, slow-*, huge-* acked; {}",
        sidecar.metrics().await
    );
    // The dead-letter count above is not proof that every retry was made: a message
    // duplicated by a lost connection (its copy confirmed, its ack lost: at-least-once) is
    // dead-lettered twice, and six letters can then be reached while an id still has retries
    // ahead. That is the one mechanism found that fits the one failure seen (a single scrape here
    // read 3 connection resets for 6 under a fully loaded run, with every message dead-lettered
    // after its third attempt; a heartbeat of 2 s on a starved machine loses connections); the
    // scrape of that run was not kept, so it is not proven. Either way a moment's scrape raced
    // the retries: wait for the counts, then hold them exact, and again at the end (no loop).
    let timeouts = format!("rabbit_sidecar_retries_total{{{q},reason=\"timeout\"}}");
    let resets = format!("rabbit_sidecar_retries_total{{{q},reason=\"connection_reset\"}}");
    for (series, what) in [
        (
            &timeouts,
            "each hang retried twice after the handler timeout",
        ),
        (&resets, "each reset retried twice"),
    ] {
        assert!(
            sidecar
                .wait_metric(series, 6.0, Duration::from_secs(30))
                .await,
            "{what}: {series} = {}; logs:\n{}",
            sidecar.metric(series).await,
            sidecar.logs()
        );
    }
    // Counted when the broker confirms the copy, which it may already hold (the wait above).
    let dead_letters =
        format!("rabbit_sidecar_dead_letters_total{{{q},reason=\"max_deliveries\"}}");
    assert!(
        sidecar
            .wait_metric(&dead_letters, 6.0, Duration::from_secs(30))
            .await,
        "six dead letters counted"
    );
    let m = sidecar.metrics().await;
    println!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("rabbit_sidecar_") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let v = |series: String| metric_value(&m, &series).unwrap_or(f64::NAN);
    assert_eq!(v(dead_letters), 6.0);
    assert_eq!(
        v(format!(
            "rabbit_sidecar_consumer_cancellations_total{{{q},reason=\"app_down\"}}"
        )),
        0.0,
        "an app that accepts connections is not down"
    );
    assert_eq!(v("rabbit_sidecar_app_up".into()), 1.0);

    let attempts = seen.lock().unwrap().attempts.clone();
    for id in &ids {
        let expect = if id.starts_with("hang") || id.starts_with("close") {
            3
        } else {
            1
        };
        assert_eq!(attempts.get(id), Some(&expect), "{id}: {attempts:?}");
    }
    // The test server records a huge body's writes once they fail, after the sidecar drops the
    // connection.
    assert!(
        eventually(Duration::from_secs(10), || async {
            seen.lock().unwrap().huge_written.len() == 3
        })
        .await,
        "{:?}",
        seen.lock().unwrap().huge_written
    );
    let huge = seen.lock().unwrap().huge_written.clone();
    assert!(
        huge.iter().all(|w| *w < HUGE / 4),
        "the huge bodies were not read to the end: {huge:?}"
    );

    let letters = broker.drain(&dead).await;
    let mut dead_ids: Vec<String> = letters
        .iter()
        .map(|(b, p)| {
            assert_eq!(
                header_str(p, "x-sidecar-dead-letter-reason").as_deref(),
                Some("max_deliveries")
            );
            String::from_utf8_lossy(b).into_owned()
        })
        .collect();
    dead_ids.sort();
    let mut want: Vec<String> = ids
        .iter()
        .filter(|i| i.starts_with("hang") || i.starts_with("close"))
        .cloned()
        .collect();
    want.sort();
    assert_eq!(dead_ids, want);
    for (b, p) in &letters {
        let err = header_str(p, "x-sidecar-last-error").unwrap_or_default();
        let id = String::from_utf8_lossy(b);
        if id.starts_with("hang") {
            assert!(err.contains("no answer within"), "{id}: {err}");
        } else {
            assert!(err.contains("connection closed"), "{id}: {err}");
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.count(&queue).await.map(|c| c.0) == Some(0)
                && broker.count(&format!("{queue}.retry")).await.map(|c| c.0) == Some(0)
        })
        .await
    );
    assert_eq!(sidecar.get("/healthz").await.unwrap().0, 200);
    for series in [&timeouts, &resets] {
        assert_eq!(sidecar.metric(series).await, 6.0, "{series}: never a loop");
    }
    server.abort();
    broker.cleanup().await;
}
