//! A real three-node RabbitMQ cluster on this machine, started by the test beside the shared
//! `rabbit@localhost` (which it leaves alone): nodes with their own names, ports, data
//! directories and cookie, joined with `rabbitmqctl join_cluster`. A quorum queue replicated on
//! all three, a sidecar given all three node URLs. Stopping the node the sidecar is connected to,
//! or the queue's leader, moves the work on and loses nothing. The nodes are stopped and their
//! directories removed at the end, also when the test fails.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::node::{Cookie, Node};
use crate::common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

struct Cluster {
    nodes: Vec<Node>,
    // Dropped after the nodes: their CLI calls need the cookie.
    _cookie: Cookie,
}

impl Cluster {
    fn start() -> Cluster {
        let started = Instant::now();
        let cookie = Cookie::new();
        // Boot the three at once, then join the second and third to the first.
        let mut nodes: Vec<Node> = std::thread::scope(|s| {
            let c = &cookie;
            let handles: Vec<_> = ["rsa", "rsb", "rsc"]
                .into_iter()
                .map(|p| s.spawn(move || Node::start(p, c, "")))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let joining = nodes.split_off(1);
        for n in joining {
            n.ctl(&["stop_app"]).unwrap();
            n.ctl(&["join_cluster", &nodes[0].name]).unwrap();
            n.ctl(&["start_app"]).unwrap();
            n.await_startup();
            nodes.push(n);
        }
        let status = nodes[0].ctl(&["cluster_status"]).unwrap();
        for n in &nodes {
            assert!(status.contains(&n.name), "{status}");
        }
        println!("cluster of 3 up in {:?}", started.elapsed());
        Cluster {
            nodes,
            _cookie: cookie,
        }
    }

    fn urls(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|i| self.nodes[*i].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn by_port(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| node.ends_with(&format!(":{}", n.amqp_port)))
            .unwrap_or_else(|| panic!("{node} is none of the cluster's nodes"))
    }

    /// The node name of the queue's leader, as some running node sees it.
    fn leader(&self, from: usize, queue: &str) -> String {
        let out = self.nodes[from]
            .ctl(&["list_queues", "-q", "--no-table-headers", "name", "leader"])
            .unwrap();
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(queue)).then(|| f.next().unwrap_or("").to_string())
            })
            .unwrap_or_default()
    }
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap()
}

async fn declare_and_publish(conn: &Connection, queue: &str, n: usize) -> Vec<String> {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("c-{i}");
        let confirm = ch
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
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        ids.push(id);
    }
    ids
}

async fn ready(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "".into()).await;
    Some(q.message_count())
}

async fn connected_node(sidecar: &Sidecar) -> Option<String> {
    let (_, body) = sidecar.get("/status").await?;
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    doc["broker"]["node"].as_str().map(str::to_string)
}

fn spawn(queue: &str, urls: &str, app: &App) -> Sidecar {
    Sidecar::start(&[
        "--amqp-url",
        urls,
        "--queue",
        queue,
        "--target-url",
        &app.url(),
        "--heartbeat",
        "2s",
        "--connect-timeout",
        "2s",
        "--reconnect-backoff",
        "100ms",
        "--reconnect-backoff-max",
        "1s",
        "--prefetch",
        "20",
        "--max-deliveries",
        "50",
    ])
}

/// Every id accepted, the queue and its retry queue empty; returns how many answers were not 2xx.
async fn check_all_done(
    app: &App,
    ids: &[String],
    conn: &Connection,
    queue: &str,
    s: &Sidecar,
) -> usize {
    // Accepted (answered 2xx), not merely received: a retry copy lost with a stopped node would
    // leave its id received once, answered 500, and never accepted.
    let want: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        eventually(Duration::from_secs(60), || async {
            let got: HashSet<String> = app.accepted().into_iter().collect();
            want.is_subset(&got)
        })
        .await,
        "lost messages: {} of {} accepted; never accepted: {:?}; logs:\n{}",
        app.accepted().into_iter().collect::<HashSet<_>>().len(),
        want.len(),
        {
            let got: HashSet<String> = app.accepted().into_iter().collect();
            want.difference(&got).take(20).cloned().collect::<Vec<_>>()
        },
        s.logs()
    );
    let retry = format!("{queue}.retry");
    assert!(
        eventually(Duration::from_secs(30), || async {
            ready(conn, queue).await == Some(0) && ready(conn, &retry).await == Some(0)
        })
        .await,
        "queue and retry queue drained: ready {:?}, retry queue {:?}; status {:?}; logs:\n{}",
        ready(conn, queue).await,
        ready(conn, &retry).await,
        s.get("/status").await,
        s.logs()
    );
    for (r, _) in app.answered() {
        assert_eq!(r.uri, "/", "every request goes to the target URL's path");
    }
    let failed = app
        .answered()
        .iter()
        .filter(|(_, status)| !(200..300).contains(status))
        .count();
    println!(
        "{} requests to the app for {} ids ({} of them answered other than 2xx)",
        app.count(),
        ids.len(),
        failed
    );
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_the_sidecar_is_connected_to_moves_it_to_another_node() {
    let mut cluster = Cluster::start();
    let queue = unique("cluster-conn");
    let app = App::start().await;
    app.set_delay(Duration::from_millis(150));
    let sidecar = spawn(&queue, &cluster.urls(&[0, 1, 2]), &app);
    let admin = connect(&cluster.nodes[2].url()).await;
    let ids = declare_and_publish(&admin, &queue, 600).await;
    sidecar.wait_ready(Duration::from_secs(30)).await;
    let first = connected_node(&sidecar).await.expect("connected");
    let victim = cluster.by_port(&first);
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 30 }).await);
    // From the stop on, every tenth id fails its first attempt: its retry copy goes to a retry
    // queue whose node may be the one that is gone.
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopped.clone();
    app.answer(move |r| {
        let first_attempt = r.header("x-amqp-attempt") == Some("1");
        if flag.load(std::sync::atomic::Ordering::SeqCst) && first_attempt && r.id().ends_with('0')
        {
            500
        } else {
            200
        }
    });

    let survivor_conn = if victim == 2 {
        connect(&cluster.nodes[1].url()).await
    } else {
        admin
    };
    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    cluster.nodes[victim].stop();
    assert!(
        eventually(Duration::from_secs(20), || async {
            matches!(connected_node(&sidecar).await, Some(n) if n != first)
        })
        .await,
        "the sidecar moved off {first}; logs:\n{}",
        sidecar.logs()
    );
    let now = connected_node(&sidecar).await.unwrap();
    assert_ne!(cluster.by_port(&now), victim);
    let failed = check_all_done(&app, &ids, &survivor_conn, &queue, &sidecar).await;
    assert!(
        failed > 0,
        "some first attempts were failed, so retry copies were made"
    );
    let m = sidecar.metrics().await;
    assert!(metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap() >= 1.0);
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "rabbit_sidecar_dead_letters_total{{queue=\"{queue}\",reason=\"max_deliveries\"}}"
            )
        ),
        Some(0.0)
    );
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    println!(
        "sidecar moved from {first} to {now}; leader now {}",
        cluster.leader(survivor, &queue)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_quorum_leader_loses_nothing() {
    let mut cluster = Cluster::start();
    let queue = unique("cluster-leader");
    let admin = connect(&cluster.nodes[0].url()).await;
    let ids = declare_and_publish(&admin, &queue, 600).await;
    let leader_name = cluster.leader(0, &queue);
    let leader = cluster
        .nodes
        .iter()
        .position(|n| n.name == leader_name)
        .unwrap_or_else(|| panic!("leader {leader_name:?} is a cluster node"));
    // The sidecar prefers a follower, so it is the leader's loss, not its own node's, it rides out.
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let app = App::start().await;
    app.set_delay(Duration::from_millis(150));
    let sidecar = spawn(&queue, &cluster.urls(&[follower, other, leader]), &app);
    sidecar.wait_ready(Duration::from_secs(30)).await;
    let before = connected_node(&sidecar).await.unwrap();
    assert_eq!(cluster.by_port(&before), follower);
    assert!(eventually(Duration::from_secs(10), || async { app.count() >= 30 }).await);

    let admin = if leader == 0 {
        connect(&cluster.nodes[follower].url()).await
    } else {
        admin
    };
    cluster.nodes[leader].stop();
    let new_leader = {
        let mut l = String::new();
        let found = eventually(Duration::from_secs(30), || {
            l = cluster.leader(follower, &queue);
            let ok = !l.is_empty() && l != leader_name;
            async move { ok }
        })
        .await;
        assert!(found, "a new leader was elected");
        l
    };
    check_all_done(&app, &ids, &admin, &queue, &sidecar).await;
    let m = sidecar.metrics().await;
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    println!(
        "leader {leader_name} stopped, {new_leader} elected; sidecar stayed on {before}, reconnects {}",
        metric_value(&m, "rabbit_sidecar_reconnects_total").unwrap()
    );
}
