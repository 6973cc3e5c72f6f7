//! TLS to the broker: a node started by the test with a TLS listener that requires client
//! certificates, and a CA the test generates. The sidecar connects over `amqps://` with
//! `--tls-ca-file` and a client certificate (mutual TLS) and consumes; with the wrong CA it fails
//! clearly (logged, `connect_failures_total` moves, `/readyz` 503 with a reason), not by hanging.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::common::node::{Cookie, Node, free_port_pair, inside, tempdir};
use crate::common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, PKCS#8 key PEM) signed by `ca`.
fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_mutual_tls_consumes_and_a_wrong_ca_fails_clearly() {
    // Where the node (run inside the RabbitMQ 4 root on 4) can read its files too.
    let certs = tempdir();
    let d = certs.path();
    let good = ca("rabbit-sidecar test CA");
    let wrong = ca("some other CA");
    let (server_cert, server_key) = leaf(&good, "localhost", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = leaf(&good, "rabbit-sidecar", &["rabbit-sidecar"]);
    let ca_file = write(d, "ca.pem", &good.pem);
    let wrong_ca_file = write(d, "wrong-ca.pem", &wrong.pem);
    let server_cert_file = write(d, "server.pem", &server_cert);
    let server_key_file = write(d, "server.key", &server_key);
    let client_cert_file = write(d, "client.pem", &client_cert);
    let client_key_file = write(d, "client.key", &client_key);

    let (tls_port, _) = free_port_pair();
    let node_path = |p: &str| inside(Path::new(p)).to_string_lossy().into_owned();
    let (ca_in, cert_in, key_in) = (
        node_path(&ca_file),
        node_path(&server_cert_file),
        node_path(&server_key_file),
    );
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {ca_in}\n\
         ssl_options.certfile = {cert_in}\n\
         ssl_options.keyfile = {key_in}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n"
    );
    let cookie = Cookie::new();
    let node = Node::start("rstls", &cookie, &conf);

    // The test publishes over the node's plain listener.
    let conn = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queue = unique("tls");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = format!("t-{i}");
        let c = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                id.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
        ids.push(id);
    }

    let app = App::start().await;
    let url = app.url();
    let amqps = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let base = |ca: &str| {
        vec![
            "--amqp-url".to_string(),
            amqps.clone(),
            "--queue".into(),
            queue.clone(),
            "--target-url".into(),
            url.clone(),
            "--tls-ca-file".into(),
            ca.to_string(),
            "--tls-cert-file".into(),
            client_cert_file.clone(),
            "--tls-key-file".into(),
            client_key_file.clone(),
            "--connect-timeout".into(),
            "2s".into(),
            "--reconnect-backoff".into(),
            "200ms".into(),
            "--reconnect-backoff-max".into(),
            "1s".into(),
        ]
    };

    // The wrong CA: the server's certificate is refused, clearly and quickly.
    let args = base(&wrong_ca_file);
    let bad = Sidecar::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        eventually(Duration::from_secs(15), || async {
            bad.metric("rabbit_sidecar_connect_failures_total").await >= 2.0
        })
        .await,
        "connection failures are counted; logs:\n{}",
        bad.logs()
    );
    let (status, reason) = bad.get("/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(reason.contains("not connected"), "{reason}");
    assert_eq!(bad.get("/healthz").await.unwrap().0, 200);
    assert_eq!(bad.metric("rabbit_sidecar_connection_up").await, 0.0);
    let logs = bad.logs().to_lowercase();
    assert!(
        logs.contains("certificate") || logs.contains("unknownissuer"),
        "the log says why: {logs}"
    );
    drop(bad);
    assert!(app.count() == 0);

    // The right CA and a client certificate: connected over TLS, everything consumed.
    let args = base(&ca_file);
    let good_sidecar = Sidecar::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    good_sidecar.wait_ready(Duration::from_secs(20)).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.ids().into_iter().collect::<HashSet<_>>() == ids.iter().cloned().collect()
        })
        .await,
        "consumed over TLS; logs:\n{}",
        good_sidecar.logs()
    );
    let m = good_sidecar.metrics().await;
    assert_eq!(metric_value(&m, "rabbit_sidecar_connection_up"), Some(1.0));
    assert_eq!(
        metric_value(&m, "rabbit_sidecar_connect_failures_total"),
        Some(0.0)
    );
    let conns = node
        .ctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "ssl",
            "peer_cert_subject",
            "client_properties",
        ])
        .unwrap();
    assert!(
        conns
            .lines()
            .any(|l| l.starts_with("true") && l.contains("rabbit-sidecar")),
        "the broker sees a TLS connection with the client certificate: {conns}"
    );
    drop(good_sidecar);
    let _ = conn.close(200, "".into()).await;
}
