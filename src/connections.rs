//! Bounds on the connections of one listener: how many may be open at once
//! (in all, and from one IP address), and how long an HTTP/2 connection may
//! stay without a request.
//!
//! Every open connection holds a file descriptor and a task, whatever it
//! has sent; without a cap, clients that send half a request each could
//! take every descriptor until the header read timeout. A connection beyond
//! a cap is accepted and closed at once (and counted), so the listener's
//! backlog keeps moving and the caps of one listener do not touch another:
//! the admin address answers probes while the main one is full.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its maximum of connections.
    Full,
    /// The client's address holds its maximum of connections.
    PerIp,
}

impl Refused {
    /// The `reason` label of `walrelay_http_connections_refused_total`.
    pub fn as_label(self) -> &'static str {
        match self {
            Refused::Full => "max_connections",
            Refused::PerIp => "max_connections_per_ip",
        }
    }
}

/// The connections open on one listener.
pub struct ConnectionLimit {
    /// `listener` label of the metrics: `main` or `admin`.
    listener: &'static str,
    max: usize,
    /// 0: no limit per address.
    max_per_ip: usize,
    open: Mutex<Open>,
    closed: Notify,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    limit: Arc<ConnectionLimit>,
    ip: IpAddr,
}

impl ConnectionLimit {
    pub fn new(listener: &'static str, max: usize, max_per_ip: usize) -> Arc<Self> {
        crate::metrics::register_listener_at_zero(listener);
        Arc::new(Self {
            listener,
            max: max.max(1),
            max_per_ip,
            open: Mutex::new(Open::default()),
            closed: Notify::new(),
        })
    }

    /// Takes a place for a connection from `ip`, or says why there is none
    /// (counted in `walrelay_http_connections_refused_total`).
    ///
    /// # Errors
    /// The listener, or the address, holds its maximum already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let mut open = self.lock();
        let from_ip = open.by_ip.get(&ip).copied().unwrap_or(0);
        let refused = if open.total >= self.max {
            Some(Refused::Full)
        } else if self.max_per_ip > 0 && from_ip >= self.max_per_ip {
            Some(Refused::PerIp)
        } else {
            None
        };
        if let Some(why) = refused {
            drop(open);
            metrics::counter!("walrelay_http_connections_refused_total",
                "listener" => self.listener, "reason" => why.as_label())
            .increment(1);
            return Err(why);
        }
        open.total += 1;
        *open.by_ip.entry(ip).or_insert(0) += 1;
        let total = open.total;
        drop(open);
        metrics::gauge!("walrelay_http_connections", "listener" => self.listener).set(total as f64);
        Ok(Admitted {
            limit: Arc::clone(self),
            ip,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close in between wakes it.
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
        let total = open.total;
        drop(open);
        metrics::gauge!("walrelay_http_connections", "listener" => self.limit.listener)
            .set(total as f64);
        self.limit.closed.notify_waiters();
    }
}

/// Requests in progress on one connection, and when the last one ended:
/// what tells an idle HTTP/2 connection from a busy one. hyper closes an
/// idle HTTP/1 connection at its header read timeout, but has no such
/// deadline for HTTP/2, and a client answers keep-alive pings however
/// long it stays silent.
pub struct Activity {
    active: AtomicUsize,
    last: Mutex<Instant>,
}

/// One request in progress; dropping it ends it.
pub struct Active(Arc<Activity>);

impl Activity {
    /// A connection opened now: its first request is due within the idle
    /// deadline like any later one.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        })
    }

    /// A request starts.
    pub fn begin(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Active(Arc::clone(self))
    }

    /// Resolves once the connection has had no request in progress for
    /// `idle` (since it opened, or since its last request ended).
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.last_change() + idle;
            tokio::time::sleep_until(due).await;
            if self.active.load(Ordering::SeqCst) > 0 {
                // Busy: the deadline counts from the end of its requests.
                tokio::time::sleep(idle).await;
                continue;
            }
            if self.last_change() + idle <= Instant::now() {
                return;
            }
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last_change(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The soft limit of open files of this process (`/proc/self/limits`),
/// when it can be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_until_one_closes() {
        let limit = ConnectionLimit::new("test", 2, 0);
        let a = limit.admit(ip(1)).unwrap();
        let _b = limit.admit(ip(2)).unwrap();
        assert_eq!(limit.admit(ip(3)).err(), Some(Refused::Full));
        drop(a);
        assert!(limit.admit(ip(3)).is_ok());
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let limit = ConnectionLimit::new("test", 10, 2);
        let _a = limit.admit(ip(1)).unwrap();
        let b = limit.admit(ip(1)).unwrap();
        assert_eq!(limit.admit(ip(1)).err(), Some(Refused::PerIp));
        assert!(limit.admit(ip(2)).is_ok(), "another address still gets in");
        drop(b);
        assert!(limit.admit(ip(1)).is_ok());
    }

    #[tokio::test]
    async fn all_closed_waits_for_the_last_connection() {
        let limit = ConnectionLimit::new("test", 4, 0);
        let a = limit.admit(ip(1)).unwrap();
        let waiter = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.all_closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_when_no_request_ran_for_the_whole_deadline() {
        let activity = Activity::new();
        let idle = Duration::from_secs(3);
        let started = Instant::now();
        let request = activity.begin();
        let watch = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move {
                activity.idle_for(idle).await;
                Instant::now()
            }
        });
        // A request lasting 10 s is not idleness.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watch.is_finished());
        drop(request);
        let ended = Instant::now();
        let at = watch.await.unwrap();
        assert!(at >= ended + idle, "idle at {:?}", at - started);
        assert!(at <= ended + idle * 2, "idle at {:?}", at - started);
    }

    #[test]
    fn the_open_files_limit_is_read() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
