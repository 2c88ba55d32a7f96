//! A TCP proxy that can cut the line: the demo's `--outage` and the tests use
//! it to take the broker away from the agent for real (connections reset,
//! new connections refused) without stopping the broker itself.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CutProxy {
    addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(watch::channel(true).0);
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of file descriptors or similar: don't spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                if !*up2.borrow() {
                    // Cut: refuse by closing at once.
                    drop(inbound);
                    continue;
                }
                let rx = up2.subscribe();
                tokio::spawn(pipe(inbound, upstream, rx));
            }
        });
        Ok(CutProxy { addr, up, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

async fn pipe(mut inbound: TcpStream, upstream: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = up.wait_for(|v| !*v) => {}
    }
}
