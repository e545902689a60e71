//! Traffic mode (SPEC §9): the agent listens on an app's `listen` address and forwards each
//! TCP connection to the port of a running version. The route, which versions get new
//! connections and in what shares, is swapped atomically; a connection stays with the
//! version it was given until it ends, so a switch drops nothing.
//!
//! Bytes move between the two sockets with `splice(2)` through a pipe, never through user
//! space; where a pipe cannot be had, through one fixed buffer per direction.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// Bytes one splice moves at most, and the size asked of each pipe.
const PIPE_SIZE: usize = 256 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One running version that can take connections.
pub struct Backend {
    pub version: String,
    pub port: u16,
    conns: AtomicUsize,
    /// Whether a process of the version holds its port (false while it restarts).
    up: std::sync::atomic::AtomicBool,
    /// Bumped as connections end (watchers wait for `conns` to reach 0).
    ended: watch::Sender<u64>,
    /// Set when the version is gone: its remaining connections are cut.
    cut: watch::Sender<bool>,
}

impl Backend {
    pub fn new(version: &str, port: u16) -> Arc<Backend> {
        Arc::new(Backend {
            version: version.to_string(),
            port,
            conns: AtomicUsize::new(0),
            up: std::sync::atomic::AtomicBool::new(true),
            ended: watch::Sender::new(0),
            cut: watch::Sender::new(false),
        })
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Connections open to this version now.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }

    /// Waits until no connection is open to this version, or `deadline` passes; says
    /// whether it drained.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let mut ended = self.ended.subscribe();
        let drained = async {
            while self.connections() > 0 {
                if ended.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(deadline, drained).await.is_ok()
    }

    /// Cuts every connection still open to this version.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// Holds a connection's place in its backend's count.
struct Counted(Arc<Backend>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.send_modify(|n| *n += 1);
    }
}

/// Which versions get new connections, with their shares (percent, adding up to 100).
#[derive(Clone, Default)]
pub struct Route(pub Vec<(Arc<Backend>, u8)>);

impl Route {
    pub fn describe(&self) -> String {
        self.0.iter().map(|(b, w)| format!("{} {w}% (port {})", b.version, b.port)).collect::<Vec<_>>().join(", ")
    }
}

/// One app's listener.
pub struct Listener {
    pub app: String,
    pub addr: SocketAddr,
    route: RwLock<Route>,
    accepted: AtomicU64,
    closed: watch::Sender<bool>,
    /// Connections being forwarded now, and the most there may be.
    open: AtomicUsize,
    max_open: usize,
}

impl Listener {
    /// Binds `addr` and starts accepting; connections are refused (closed) until a route
    /// is set.
    pub async fn bind(app: &str, addr: SocketAddr) -> io::Result<Arc<Listener>> {
        let socket = TcpListener::bind(addr).await?;
        let listener = Arc::new(Listener {
            app: app.to_string(),
            addr: socket.local_addr()?,
            route: RwLock::new(Route::default()),
            accepted: AtomicU64::new(0),
            closed: watch::Sender::new(false),
            open: AtomicUsize::new(0),
            max_open: max_open(),
        });
        info!(%app, addr = %listener.addr, "Listening for the app's traffic.");
        tokio::spawn(listener.clone().accept_loop(socket));
        Ok(listener)
    }

    /// Swaps the route: every connection accepted from now on follows the new one.
    pub fn set(&self, route: Route) {
        info!(app = %self.app, route = %route.describe(), "Traffic route set.");
        *self.route.write().unwrap_or_else(|p| p.into_inner()) = route;
    }

    pub fn route(&self) -> Route {
        self.route.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The backend the n-th connection goes to, counted before the route lock is let go
    /// (so a drain that starts after a route change sees it): positions 0..100 are visited
    /// in a scattered order (61 is coprime to 100), so any 100 consecutive connections
    /// split exactly by the weights. A backend that is down (restarting) or was tried
    /// already is passed over for another of the route.
    fn pick(&self, n: u64, tried: &[Arc<Backend>]) -> Option<Counted> {
        let route = self.route.read().unwrap_or_else(|p| p.into_inner());
        let usable = |b: &Arc<Backend>| b.is_up() && !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let slot = (n.wrapping_mul(61) % 100) as u32;
        let mut acc = 0u32;
        let chosen = route.0.iter().find(|(_, w)| {
            acc += u32::from(*w);
            slot < acc
        });
        let b = chosen
            .map(|(b, _)| b)
            .filter(|b| usable(b))
            .or_else(|| route.0.iter().filter(|(_, w)| *w > 0).map(|(b, _)| b).find(|b| usable(b)))?;
        b.conns.fetch_add(1, Ordering::AcqRel);
        Some(Counted(b.clone()))
    }

    /// Stops accepting (and lets go of the address).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    async fn accept_loop(self: Arc<Self>, socket: TcpListener) {
        let mut told = false;
        let mut closed = self.closed.subscribe();
        loop {
            let accepted = tokio::select! {
                a = socket.accept() => a,
                _ = closed.wait_for(|c| *c) => return,
            };
            match accepted {
                Ok((client, _)) => {
                    told = false;
                    if self.open.load(Ordering::Acquire) >= self.max_open {
                        // Past the cap the connection is closed at once: the agent keeps the
                        // descriptors its channels and its other apps need.
                        warn!(app = %self.app, max = self.max_open, "Too many open connections; refusing one.");
                        continue;
                    }
                    let n = self.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(forward(self.clone(), client, n));
                }
                Err(e) => {
                    // Out of descriptors, mostly: the listener itself lives on.
                    if !told {
                        warn!(app = %self.app, error = %e, "Cannot accept a connection.");
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

async fn forward(listener: Arc<Listener>, client: TcpStream, n: u64) {
    let _open = OpenGuard::new(&listener.open);
    let mut tried = Vec::new();
    let (counted, server) = loop {
        let Some(counted) = listener.pick(n, &tried) else { return };
        let b = counted.0.clone();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", b.port))).await {
            Ok(Ok(s)) => break (counted, s),
            Ok(Err(e)) => {
                warn!(app = %listener.app, version = %b.version, port = b.port, error = %e, "Cannot reach the version's service; trying another.")
            }
            Err(_) => {
                warn!(app = %listener.app, version = %b.version, port = b.port, "The version's service did not accept in time; trying another.")
            }
        }
        tried.push(b);
    };
    let mut cut = counted.0.cut.subscribe();
    for s in [client.as_fd(), server.as_fd()] {
        let _ = rustix::net::sockopt::set_tcp_nodelay(s, true);
        // A peer that vanished without a word is found out within a few minutes.
        let _ = rustix::net::sockopt::set_socket_keepalive(s, true);
        let _ = rustix::net::sockopt::set_tcp_keepidle(s, Duration::from_secs(60));
        let _ = rustix::net::sockopt::set_tcp_keepintvl(s, Duration::from_secs(10));
        let _ = rustix::net::sockopt::set_tcp_keepcnt(s, 6);
    }
    tokio::select! {
        _ = relay(client, server) => {}
        _ = cut.wait_for(|c| *c) => {}
    }
    drop(counted);
}

/// Holds a connection's place in the listener's count of open connections.
struct OpenGuard<'a>(&'a AtomicUsize);

impl<'a> OpenGuard<'a> {
    fn new(open: &'a AtomicUsize) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Moves bytes both ways until both directions have ended (or one fails).
async fn relay(mut client: TcpStream, mut server: TcpStream) {
    let pipes = (pipe(), pipe());
    if let (Ok(up), Ok(down)) = pipes {
        let _ = tokio::try_join!(splice_one_way(&client, &server, up), splice_one_way(&server, &client, down));
    } else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}

/// Connections one listener forwards at most: an eighth of the descriptors this process
/// may open (six per connection, the rest for everything else).
fn max_open() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(65536);
    (limit / 8).max(64) as usize
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // Larger pipes move more per call; the default (64 KiB) serves when it cannot grow.
    let _ = fcntl_setpipe_size(&w, PIPE_SIZE);
    Ok((r, w))
}

/// `from` → pipe → `to`, until `from` ends; then `to` is shut for writing. The pipe is
/// always emptied before it is filled again, so an EAGAIN while filling can only mean
/// `from` has nothing to read, and tokio's readiness stays true.
async fn splice_one_way(from: &TcpStream, to: &TcpStream, (pr, pw): (OwnedFd, OwnedFd)) -> io::Result<()> {
    use rustix::pipe::{splice, SpliceFlags};
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || Ok(splice(from.as_fd(), None, &pw, None, PIPE_SIZE, flags)?));
        let mut in_pipe = match moved {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || Ok(splice(&pr, None, to.as_fd(), None, in_pipe, flags)?)) {
                Ok(n) => in_pipe -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(())
}
