//! A loopback TCP relay that can black-hole its traffic: the network partition of a test. While
//! cut, bytes in both directions are read and dropped and connections stay open, as when a
//! link goes dark; a peer notices only through its own timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone)]
pub struct Partition {
    /// `host:port` to connect to instead of the target.
    pub addr: String,
    cut: Arc<AtomicBool>,
}

impl Partition {
    /// Relays connections on a free loopback port to `target` (`host:port`).
    pub async fn start(target: &str) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (target, relay_cut) = (target.to_owned(), cut.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, cut) = (target.clone(), relay_cut.clone());
                tokio::spawn(async move {
                    if cut.load(Ordering::SeqCst) {
                        // A dark link: the connection opens, and what is sent goes nowhere.
                        let (mut read, _write) = inbound.into_split();
                        let _ = tokio::io::copy(&mut read, &mut tokio::io::sink()).await;
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(&target).await else { return };
                    let (a_read, a_write) = inbound.into_split();
                    let (b_read, b_write) = outbound.into_split();
                    tokio::spawn(pump(a_read, b_write, cut.clone()));
                    tokio::spawn(pump(b_read, a_write, cut));
                });
            }
        });
        Partition { addr, cut }
    }

    /// Black-holes the link from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Lets traffic through again (connections that lost bytes meanwhile will fail and be
    /// reopened by their owners).
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, cut: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
