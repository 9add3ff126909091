//! A loopback TCP proxy for the fault suite: forwards each connection to the first of its
//! upstreams that accepts one (a load balancer in front of API replicas or RabbitMQ
//! nodes), and can stop forwarding (a partition: bytes are held, not refused, as when
//! packets are dropped) and start again. Dropping it closes every connection.

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct Proxy {
    pub port: u16,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstreams`, tried in order.
    pub async fn start(upstreams: Vec<SocketAddr>) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the proxy's port")?;
        let port = listener.local_addr()?.port();
        let upstreams = Arc::new(Mutex::new(upstreams));
        let (paused, rx) = watch::channel(false);
        let ups = upstreams.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((sock, _)) = a else { continue };
                        let _ = sock.set_nodelay(true);
                        conns.spawn(serve(sock, ups.clone(), rx.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Proxy { port, paused, task })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops (true) or resumes (false) forwarding, on open connections and new ones.
    pub fn pause(&self, on: bool) {
        let _ = self.paused.send(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_open(rx: &mut watch::Receiver<bool>) {
    while *rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(
    client: TcpStream,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    mut rx: watch::Receiver<bool>,
) {
    wait_open(&mut rx).await;
    let list: Vec<SocketAddr> = upstreams.lock().map(|g| g.clone()).unwrap_or_default();
    let mut up = None;
    for a in list {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(a)).await
        {
            let _ = s.set_nodelay(true);
            up = Some(s);
            break;
        }
    }
    let Some(up) = up else { return };
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    let a = pipe(cr, uw, rx.clone());
    let b = pipe(ur, cw, rx);
    // Either side closing ends the connection (the other half is dropped with it).
    tokio::select! {
        _ = a => {}
        _ = b => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_open(&mut rx).await;
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A partition starts while we wait for bytes: wait for it to end first.
            _ = rx.changed() => continue,
        };
        // Bytes read while a partition started are held until it ends.
        wait_open(&mut rx).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes what it reads.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        a
    }

    #[tokio::test]
    async fn fails_over_holds_bytes_while_paused_and_resumes() {
        // The first upstream refuses connections: the proxy takes the second.
        let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let p = Proxy::start(vec![dead_addr, echo().await])
            .await
            .expect("proxy");
        let mut c = TcpStream::connect(("127.0.0.1", p.port))
            .await
            .expect("connect");
        let mut b = [0u8; 5];
        c.write_all(b"hello").await.expect("write");
        c.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"hello");

        p.pause(true);
        c.write_all(b"again").await.expect("write");
        let held = tokio::time::timeout(Duration::from_millis(400), c.read_exact(&mut b)).await;
        assert!(held.is_err(), "bytes went through a paused proxy");
        p.pause(false);
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .expect("bytes flow again after the pause")
            .expect("read");
        assert_eq!(&b, b"again");
    }
}
