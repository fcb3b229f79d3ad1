//! Loopback ports.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A port that was free on 127.0.0.1 a moment ago (bind to port 0, read the
/// port the kernel chose, drop the listener).
///
/// Another process can take it before it is used; callers that start servers
/// on it retry with a new port when the server reports "address already in
/// use" (see [`crate::prometheus`] and [`crate::relay`]).
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(p) => p,
        // Binding port 0 on loopback only fails when the machine is out of
        // ports or loopback is down; nothing in a test can continue then.
        Err(e) => panic!("cannot find a free port on 127.0.0.1: {e:#}"),
    }
}

/// Fallible form of [`free_port`].
pub fn try_free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until a TCP connection to `addr` succeeds, retrying every 20 ms.
pub async fn wait_for_tcp(addr: impl ToSocketAddrs, timeout: Duration) -> Result<()> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        bail!("wait_for_tcp: address resolves to nothing");
    }
    let deadline = Instant::now() + timeout;
    loop {
        for a in &addrs {
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(a),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted TCP connections on {addrs:?} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
