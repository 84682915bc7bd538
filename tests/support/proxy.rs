//! A TCP proxy of the tests' own between the cache and its `redis-server`,
//! to inject network faults: added latency, a long link (a delay line), a
//! black hole (connections stay open, nothing gets through), replies cut in
//! the middle, resets, and RESP3 pushes lost on the way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Faults {
    /// Added to every reply, in ms.
    latency_ms: AtomicU64,
    /// Every reply arrives this long after Redis sent it, in µs, with no
    /// reply held up by the ones before it.
    delay_line_us: AtomicU64,
    /// RESP3 push frames (`>`: invalidations, pub/sub messages) are
    /// dropped; everything else gets through.
    drop_pushes: AtomicBool,
    /// Nothing is forwarded in either direction.
    blackhole: AtomicBool,
    /// The next reply is cut after half its bytes and the connection closed.
    cut_next_reply: AtomicBool,
    /// New connections are closed at once.
    refuse: AtomicBool,
    /// Replies have these bytes replaced by those (of the same length, so
    /// that RESP lengths stay right).
    rewrite: std::sync::Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

/// A running proxy, on a thread and runtime of its own (so it keeps
/// forwarding whatever the test's runtime is doing); stops when dropped.
pub struct Proxy {
    port: u16,
    faults: Arc<Faults>,
    reset: watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream_port`.
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let faults = Arc::new(Faults::default());
        let (reset, resets) = watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let shared = faults.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = accept_loop(listener, upstream, shared, resets) => {}
                    _ = stopped => {}
                }
            });
        });
        Proxy {
            port,
            faults,
            reset,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Delays every reply by `latency` (zero to stop).
    pub fn set_latency(&self, latency: Duration) {
        self.faults
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Delays every reply by `latency` after Redis sent it, without holding
    /// back the replies behind it: a long link, not a slow one (zero to
    /// stop). Unlike [`Proxy::set_latency`], pipelined replies all arrive
    /// one `latency` late.
    pub fn set_delay_line(&self, latency: Duration) {
        self.faults
            .delay_line_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Drops every RESP3 push frame from Redis (a connection that answers
    /// but delivers no invalidation). Set it before the connections open:
    /// a reply already half forwarded is not parsed.
    pub fn set_drop_pushes(&self, on: bool) {
        self.faults.drop_pushes.store(on, Ordering::SeqCst);
    }

    /// Swallows all traffic (a partition that leaves sockets open).
    pub fn set_blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::SeqCst);
    }

    /// Cuts the next reply in half and closes its connection.
    pub fn cut_next_reply(&self) {
        self.faults.cut_next_reply.store(true, Ordering::SeqCst);
    }

    /// Refuses (closes at once) every new connection while on.
    pub fn set_refuse(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::SeqCst);
    }

    /// Replaces `from` by `to` (as long) in every reply: a server that
    /// says something else than the one behind the proxy.
    pub fn rewrite_replies(&self, from: &[u8], to: &[u8]) {
        assert_eq!(from.len(), to.len(), "a rewrite keeps lengths");
        *self.faults.rewrite.lock().expect("not poisoned") = Some((from.to_vec(), to.to_vec()));
    }

    /// Resets every open connection.
    pub fn reset_all(&self) {
        self.reset.send_modify(|generation| *generation += 1);
    }

    /// Back to a clean network.
    pub fn heal(&self) {
        self.set_latency(Duration::ZERO);
        self.set_delay_line(Duration::ZERO);
        self.set_drop_pushes(false);
        self.set_blackhole(false);
        self.set_refuse(false);
        self.faults.cut_next_reply.store(false, Ordering::SeqCst);
        *self.faults.rewrite.lock().expect("not poisoned") = None;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Arc<Faults>,
    resets: watch::Receiver<u64>,
) {
    loop {
        // An accept can fail for one connection (reset before it was
        // accepted, as the resets here do): the proxy keeps serving.
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if faults.refuse.load(Ordering::SeqCst) {
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        let faults = faults.clone();
        let mut resets = resets.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            resets.mark_unchanged();
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = client.set_zero_linger();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, faults.clone());
            let down = replies(server_read, client_write, faults);
            tokio::select! {
                _ = up => {}
                _ = down => {}
                _ = resets.changed() => {}
            }
            // Dropping both halves closes the connection (with a reset, as
            // linger is zero).
        });
    }
}

/// Copies requests until the connection closes or a fault ends it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if faults.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Copies replies until the connection closes or a fault ends it: read and
/// faulted here, written by a writer of their own when they are due (so
/// that a delay line holds no reply behind another).
async fn replies(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
) {
    let (due, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if faults.blackhole.load(Ordering::SeqCst) {
                continue;
            }
            let latency = faults.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            let mut bytes = buf[..n].to_vec();
            if faults.drop_pushes.load(Ordering::SeqCst) || !frames.is_empty() {
                frames.extend_from_slice(&bytes);
                bytes = without_pushes(&mut frames);
            }
            let at =
                Instant::now() + Duration::from_micros(faults.delay_line_us.load(Ordering::SeqCst));
            if faults.cut_next_reply.swap(false, Ordering::SeqCst) {
                bytes.truncate(bytes.len().div_ceil(2));
                let _ = due.send((at, bytes));
                return;
            }
            if let Some((old, new)) = faults.rewrite.lock().expect("not poisoned").as_ref() {
                let mut from = 0;
                while let Some(found) = bytes[from..].windows(old.len()).position(|w| w == old) {
                    bytes[from + found..from + found + new.len()].copy_from_slice(new);
                    from += found + new.len();
                }
            }
            if !bytes.is_empty() && due.send((at, bytes)).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = queued.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // The reader ends first (closed or cut); the writer then sends what
    // it holds and ends.
    tokio::join!(read, write);
}

/// Takes the complete RESP frames off the front of `frames` and returns
/// them less the push frames; an incomplete one stays for the next read.
fn without_pushes(frames: &mut Vec<u8>) -> Vec<u8> {
    let mut kept = Vec::with_capacity(frames.len());
    let mut at = 0;
    while let Some(len) = frame_len(&frames[at..]) {
        if frames[at] != b'>' {
            kept.extend_from_slice(&frames[at..at + len]);
        }
        at += len;
    }
    frames.drain(..at);
    kept
}

/// The length of the RESP2/RESP3 frame at the start of `buf`, once all of
/// it is there. An unknown type byte takes the rest of the buffer as is.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let kind = *buf.first()?;
    let line = buf.windows(2).position(|w| w == b"\r\n")?;
    let after = line + 2;
    let count = || -> Option<i64> { std::str::from_utf8(&buf[1..line]).ok()?.parse().ok() };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(after),
        b'$' | b'!' | b'=' => match count()? {
            n if n < 0 => Some(after),
            n => {
                let end = after + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
        },
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = count()?;
            if n < 0 {
                return Some(after);
            }
            // A map's and an attribute's entries are pairs; an attribute
            // is followed by the value it describes.
            let items = if matches!(kind, b'%' | b'|') {
                2 * n
            } else {
                n
            };
            let mut at = after;
            for _ in 0..items + i64::from(kind == b'|') {
                at += frame_len(&buf[at..])?;
            }
            Some(at)
        }
        _ => Some(buf.len()),
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
