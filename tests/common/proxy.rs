//! An in-test TCP proxy for network faults: listens on a free loopback port, forwards every
//! connection to an upstream port, and can be told at runtime to
//!
//! - add latency ([`Proxy::set_latency`]): every chunk is delivered that much later, in both
//!   directions, without limiting throughput;
//! - reset ([`Proxy::reset`]): abort every open connection with a TCP RST; new ones still work;
//! - refuse ([`Proxy::refuse`]): reset every open connection and every new one as soon as it is
//!   accepted, until [`Proxy::restore`] (a host that is down or firewalled with `reject`);
//! - partition ([`Proxy::partition`]): stop forwarding anything, on open and new connections,
//!   while keeping them open (a network that silently drops packets), until
//!   [`Proxy::restore`]; what was held back is then delivered, as TCP would after a short
//!   outage, unless the peer gave up on the connection meanwhile.
//!
//! The proxy runs on its own thread and Tokio runtime, so it keeps forwarding whatever the
//! test's own runtime is doing (blocking Kafka reads included) and works from plain `#[test]`s.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Control {
    latency: Duration,
    refusing: bool,
    partitioned: bool,
    /// Bumped to abort every connection opened before.
    resets: u64,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct Proxy {
    pub port: u16,
    pub upstream: u16,
    control: watch::Sender<Control>,
    accepted: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding `127.0.0.1:<port>` to `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let (control, rx) = watch::channel(Control::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counter = accepted.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else { continue };
                            counter.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(connection(client, upstream, rx.clone()));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels every connection task, closing their sockets.
            })
            .unwrap();
        Proxy { port, upstream, control, accepted, stop: Some(stop), thread: Some(thread) }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Delays every chunk by `latency` (zero: no delay).
    pub fn set_latency(&self, latency: Duration) {
        self.control.send_modify(|c| c.latency = latency);
    }

    /// Aborts every open connection with a reset; new connections work.
    pub fn reset(&self) {
        self.control.send_modify(|c| c.resets += 1);
    }

    /// Resets open connections and every new one until [`Proxy::restore`].
    pub fn refuse(&self) {
        self.control.send_modify(|c| {
            c.refusing = true;
            c.resets += 1;
        });
    }

    /// Holds every byte, in both directions, until [`Proxy::restore`].
    pub fn partition(&self) {
        self.control.send_modify(|c| c.partitioned = true);
    }

    /// Back to plain forwarding: no latency, no refusal, no partition.
    pub fn restore(&self) {
        self.control.send_modify(|c| {
            c.latency = Duration::ZERO;
            c.refusing = false;
            c.partitioned = false;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Aborts a socket with RST instead of an orderly FIN.
fn abort(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Half-closes the write side (FIN) without giving up reading.
fn shutdown_write(s: &TcpStream) {
    unsafe {
        libc::shutdown(s.as_raw_fd(), libc::SHUT_WR);
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut control: watch::Receiver<Control>) {
    let generation = control.borrow().resets;
    if control.borrow().refusing {
        abort(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        abort(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let client = Arc::new(client);
    let server = Arc::new(server);
    let mut pumps = tokio::task::JoinSet::new();
    pumps.spawn(pump(client.clone(), server.clone(), control.clone()));
    pumps.spawn(pump(server.clone(), client.clone(), control.clone()));
    let aborted = async {
        loop {
            if control.changed().await.is_err() {
                return;
            }
            if control.borrow().resets != generation {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { while pumps.join_next().await.is_some() {} } => {}
        _ = aborted => {
            abort(&client);
            abort(&server);
            pumps.abort_all();
        }
    }
}

/// Copies `from` → `to`: a reader task queues chunks stamped with their due time, the writer
/// delivers each when due (and not partitioned), so latency adds delay, not a bandwidth cap.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, control: watch::Receiver<Control>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let from = from.clone();
        let control = control.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match read_some(&from, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let due = Instant::now() + control.borrow().latency;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    };
    let writer = async move {
        let mut control = control;
        while let Some((due, chunk)) = rx.recv().await {
            while control.borrow().partitioned {
                if control.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep_until(due).await;
            if write_all(&to, &chunk).await.is_err() {
                return;
            }
        }
        shutdown_write(&to);
    };
    let reader = tokio::spawn(reader);
    writer.await;
    reader.abort();
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
