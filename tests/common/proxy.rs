//! A TCP proxy between the sidecar and a broker that the test can turn into a silent partition
//! (bytes are held, connections stay open: nothing tells either side), slow down, or cut.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Forward,
    /// Hold every byte in both directions; accept new connections but never answer them.
    Blackhole,
    /// Wait this long before forwarding each chunk.
    Slow(Duration),
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by [`Proxy::cut`]: connections of an older epoch are dropped.
    epoch: watch::Sender<u64>,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Forward);
        let (epoch, epoch_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let (mode, mut epoch) = (mode_rx.clone(), epoch_rx.clone());
                conns.spawn(async move {
                    let mine = *epoch.borrow_and_update();
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, mode.clone());
                    let down = pump(sr, cw, mode);
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = epoch.wait_for(|e| *e != mine) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            mode,
            epoch,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every connection made so far (RST/FIN to both sides).
    pub fn cut(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // A partition holds the bytes until it heals; the connection stays open meanwhile.
        let Ok(current) = mode.wait_for(|m| *m != Mode::Blackhole).await.map(|m| *m) else {
            return;
        };
        if let Mode::Slow(d) = current {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
