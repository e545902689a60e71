//! A small HTTP/1.1 service for tests and benchmarks of traffic mode: it listens on
//! 127.0.0.1:$PORT and answers, over keep-alive connections,
//!
//! - `GET /health`: 200 `ok`, or 503 when the file `unhealthy` exists in its directory;
//! - `GET /bytes/N`: N bytes;
//! - `GET /work/N`: the `content` answer after spinning N µs of wall-clock time (a service computing its
//!   answer; this server runs one thread);
//! - anything else: 200 with the text of `./content` (or `$STAGEHAND_VERSION`).
//!
//! On SIGTERM it stops accepting, answers the requests in flight with `Connection: close`,
//! and exits once its connections are done (as a well-behaved service does).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

static CLOSING: AtomicBool = AtomicBool::new(false);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).expect("PORT");
    let body = std::fs::read_to_string("content")
        .unwrap_or_else(|_| std::env::var("STAGEHAND_VERSION").unwrap_or_else(|_| "hello".into()));
    let body: Arc<str> = Arc::from(body.as_str());
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("listening on 127.0.0.1:{port}");
    let open = Arc::new(AtomicUsize::new(0));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((s, _)) = accepted else { continue };
                let (body, open) = (body.clone(), open.clone());
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = serve(s, &body).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = term.recv() => break,
        }
    }
    eprintln!("SIGTERM: draining");
    CLOSING.store(true, Ordering::SeqCst);
    drop(listener);
    for _ in 0..500 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn serve(s: TcpStream, body: &str) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        // An idle keep-alive connection is closed once the service is stopping.
        let read = tokio::select! {
            n = r.read_line(&mut line) => n?,
            _ = wait_closing() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if length > 0 {
            let mut skip = vec![0u8; length.min(1 << 20)];
            r.read_exact(&mut skip).await?;
        }
        let close = CLOSING.load(Ordering::SeqCst);
        let connection = if close { "close" } else { "keep-alive" };
        let (status, payload): (&str, std::borrow::Cow<'_, [u8]>) = if path == "/health" {
            if std::path::Path::new("unhealthy").exists() {
                ("503 Service Unavailable", b"unhealthy".as_slice().into())
            } else {
                ("200 OK", b"ok".as_slice().into())
            }
        } else if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
            ("200 OK", vec![b'x'; n].into())
        } else if let Some(us) = path.strip_prefix("/work/").and_then(|n| n.parse::<u64>().ok()) {
            let until = std::time::Instant::now() + Duration::from_micros(us.min(1_000_000));
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            ("200 OK", body.as_bytes().into())
        } else {
            ("200 OK", body.as_bytes().into())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {connection}\r\nContent-Type: text/plain\r\n\r\n",
            payload.len()
        );
        w.write_all(head.as_bytes()).await?;
        w.write_all(&payload).await?;
        if close {
            return Ok(());
        }
    }
}

async fn wait_closing() {
    while !CLOSING.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
