//! An open-loop HTTP/1.1 load client for the benchmarks. Requests go out on
//! a fixed schedule whatever the replies do. A request due while its
//! connection still waits for the previous answer is measured from the time
//! it was due, not from when it could be sent: a stall counts against every
//! request it delayed (no coordinated omission, as in wrk2). One due on an
//! idle connection is measured from when it was sent, because tokio's
//! timers wake up to a millisecond late, and that lateness is the client's,
//! not the server's. hey's workers fire in bursts and report to 0.1 ms, so its
//! percentiles measured how long a burst took to clear; this reports to the
//! microsecond.
//!
//! `--connections C` keep-alive connections share `--rate R` requests a
//! second, each sending every C/R s with its own phase; with
//! `--new-connections` every request opens its own connection
//! (`Connection: close`), so the figures include connection setup through
//! the mesh. Prints one JSON object: rate achieved, errors, and latency
//! percentiles in microseconds.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

#[derive(Parser)]
struct Args {
    /// The server: `IP:PORT` (requests are `GET /`).
    target: SocketAddr,
    /// Requests a second, in all.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 10)]
    connections: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A new connection for every request.
    #[arg(long)]
    new_connections: bool,
}

/// Latencies recorded, from 1 µs to 60 s at 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    let interval = Duration::from_secs_f64(f64::from(args.connections) / f64::from(args.rate));
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(args.seconds);
    let merged = Arc::new(Mutex::new((histogram(), 0u64)));
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let phase = Duration::from_secs_f64(f64::from(c) / f64::from(args.rate));
        let (target, merged) = (args.target, merged.clone());
        let new_connections = args.new_connections;
        tasks.push(tokio::spawn(async move {
            let (hist, errors) = one_connection(target, start + phase, interval, end, new_connections).await;
            let mut m = merged.lock().unwrap_or_else(|e| e.into_inner());
            let _ = m.0.add(&hist);
            m.1 += errors;
        }));
    }
    for t in tasks {
        t.await.context("a connection's task failed")?;
    }
    let (hist, errors) = std::mem::replace(&mut *merged.lock().unwrap_or_else(|e| e.into_inner()), (histogram(), 0));
    let pct = |q: f64| hist.value_at_quantile(q);
    let report = serde_json::json!({
        "target": args.target.to_string(),
        "new_connections": args.new_connections,
        "scheduled_rps": args.rate,
        "achieved_rps": hist.len() as f64 / args.seconds as f64,
        "requests": hist.len(),
        "errors": errors,
        "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "max_us": hist.max(), "mean_us": hist.mean(),
    });
    println!("{report}");
    Ok(())
}

/// One client's schedule: a request due every `interval` from `first` until
/// `end`; the latencies of those answered, and how many failed.
async fn one_connection(
    target: SocketAddr,
    first: Instant,
    interval: Duration,
    end: Instant,
    new_connections: bool,
) -> (Histogram<u64>, u64) {
    let (mut hist, mut errors) = (histogram(), 0u64);
    let mut conn: Option<TcpStream> = None;
    let mut due = first;
    let mut buf = Vec::with_capacity(4096);
    // When the previous request was answered (or failed).
    let mut idle_since = first;
    while due < end {
        tokio::time::sleep_until(due).await;
        let from = if idle_since > due { due } else { Instant::now() };
        let outcome = async {
            if new_connections || conn.is_none() {
                let stream = TcpStream::connect(target).await?;
                stream.set_nodelay(true)?;
                conn = Some(stream);
            }
            let stream = conn.as_mut().expect("connected above");
            let request: &[u8] = if new_connections {
                b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            } else {
                b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
            };
            stream.write_all(request).await?;
            read_response(stream, &mut buf).await
        }
        .await;
        idle_since = Instant::now();
        match outcome {
            Ok(()) => {
                let micros = u64::try_from(from.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = hist.record(micros.clamp(1, 60_000_000));
            }
            Err(_) => {
                errors += 1;
                conn = None;
            }
        }
        if new_connections {
            conn = None;
        }
        due += interval;
    }
    (hist, errors)
}

/// Reads one response (status line, headers, a `Content-Length` body).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(bad("closed before the headers ended"));
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("headers not UTF-8"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad("not 200"));
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| bad("no Content-Length"))?;
    while buf.len() < head_end + length {
        if stream.read_buf(buf).await? == 0 {
            return Err(bad("closed before the body ended"));
        }
    }
    Ok(())
}
