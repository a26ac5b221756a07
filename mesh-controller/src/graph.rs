//! The live service graph: the controller scrapes the `/metrics` its nodes
//! and waypoints announced, sums them ([`Counts`]) and makes the rates of a
//! window from two scrapes ([`mesh_common::graph::graph`]).
//!
//! It scrapes only while someone looks: a graph asked for in the last
//! [`IDLE_AFTER`] keeps scraping every interval; then it stops, and the
//! next look starts it again (and waits for two scrapes a second apart, a
//! first rate).
use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use mesh_common::graph::{Counts, ServiceGraph, Vertex, graph};
use tokio::sync::Notify;
use tracing::debug;

use crate::node_api::Hub;

/// How long scraping goes on after the last look.
pub const IDLE_AFTER: Duration = Duration::from_secs(120);
/// The longest window a graph may be asked over; scrapes older go.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first look's window: the two scrapes it waits for are this far apart.
const FIRST_RATE: Duration = Duration::from_secs(1);

pub struct Collector {
    hub: Arc<Hub>,
    interval: Duration,
    state: Mutex<State>,
    looked: Notify,
}

#[derive(Default)]
struct State {
    last_look: Option<Instant>,
    /// Oldest first: (when, the counts summed over every proxy).
    scrapes: VecDeque<(Instant, Arc<Counts>)>,
    /// Proxies whose latest scrape failed: (node, why).
    failures: Vec<(String, String)>,
    /// Scrapes taken so far: a rendering of the same graph can be kept.
    taken: u64,
    /// Proxies the newest scrape read.
    scraped: usize,
}

/// A graph and what went into it.
#[derive(Debug, serde::Serialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub graph: ServiceGraph,
    /// Proxies scraped for the newest counts.
    pub proxies: usize,
    /// Proxies that could not be scraped, and why.
    pub unreachable: Vec<(String, String)>,
    /// Which scrape the newest counts are (the same for the same graph).
    #[serde(skip)]
    pub scrape: u64,
}

impl Collector {
    pub fn new(hub: Arc<Hub>, interval: Duration) -> Arc<Collector> {
        // Not more often than a first rate's scrapes (0 would spin).
        let interval = interval.max(FIRST_RATE);
        Arc::new(Collector { hub, interval, state: Mutex::default(), looked: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Scrapes every interval while the graph is looked at.
    pub async fn run(self: Arc<Self>) {
        loop {
            let watched = self.lock().last_look.is_some_and(|t| t.elapsed() < IDLE_AFTER);
            if !watched {
                // Idle: what was collected is of no use to a later look.
                self.lock().scrapes.clear();
                self.looked.notified().await;
                continue;
            }
            self.scrape().await;
            // A first look waits for a first rate: the second scrape comes soon.
            let first = self.lock().scrapes.len() < 2;
            tokio::time::sleep(if first { FIRST_RATE } else { self.interval }).await;
        }
    }

    /// The time between the oldest and the newest scrape kept.
    fn span(&self) -> Duration {
        let s = self.lock();
        match (s.scrapes.front(), s.scrapes.back()) {
            (Some((a, _)), Some((b, _))) => b.duration_since(*a),
            _ => Duration::ZERO,
        }
    }

    /// The graph over the last `window` (shorter when less has been collected).
    pub async fn graph(&self, window: Duration) -> Snapshot {
        let first_look = {
            let mut s = self.lock();
            let idle = s.last_look.is_none_or(|t| t.elapsed() >= IDLE_AFTER);
            s.last_look = Some(Instant::now());
            idle
        };
        if first_look {
            self.looked.notify_one();
        }
        // A first rate needs two scrapes, which the woken loop takes.
        let deadline = Instant::now() + FIRST_RATE + SCRAPE_TIMEOUT * 2;
        while self.span() < FIRST_RATE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = self.lock();
        let Some((now_at, now)) = s.scrapes.back().cloned() else {
            return Snapshot { graph: ServiceGraph::default(), proxies: 0, unreachable: s.failures.clone(), scrape: 0 };
        };
        let window = window.min(MAX_WINDOW);
        let (before_at, before) = s
            .scrapes
            .iter()
            .rev()
            .find(|(t, _)| now_at.duration_since(*t) >= window)
            .or(s.scrapes.front())
            .cloned()
            .unwrap_or((now_at, now.clone()));
        let seconds = now_at.duration_since(before_at).as_secs_f64();
        let mut graph = graph(&before, &now, seconds);
        graph.hide_waypoints(&self.waypoints());
        Snapshot { graph, proxies: s.scraped, unreachable: s.failures.clone(), scrape: s.taken }
    }

    /// The workloads that run waypoints, as metrics name them.
    fn waypoints(&self) -> BTreeSet<Vertex> {
        let published = self.hub.current();
        published
            .model
            .workloads
            .values()
            .filter(|w| w.native_tunnel)
            .map(|w| Vertex::Workload {
                namespace: w.namespace.clone(),
                name: if w.workload_name.is_empty() { w.name.clone() } else { w.workload_name.clone() },
            })
            .collect()
    }

    /// (node, `host:port`) of every connected proxy that announced its metrics.
    fn targets(&self) -> Vec<(String, String)> {
        let nodes = self.hub.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .filter(|(_, n)| n.connected && !n.metrics_addr.is_empty())
            .map(|(name, n)| (name.clone(), n.metrics_addr.clone()))
            .collect()
    }

    async fn scrape(&self) {
        let targets = self.targets();
        let results = futures::future::join_all(targets.iter().map(|(_, addr)| fetch(addr))).await;
        let mut sum = Counts::default();
        let mut scraped = 0;
        let mut failures = Vec::new();
        for ((node, addr), result) in targets.into_iter().zip(results) {
            match result.and_then(|text| Counts::from_text(&text)) {
                Ok(counts) => {
                    sum.add(&counts);
                    scraped += 1;
                }
                Err(e) => {
                    debug!(node = %node, addr = %addr, "scraping for the graph: {e}");
                    failures.push((node, format!("{addr}: {e}")));
                }
            }
        }
        let mut s = self.lock();
        let at = Instant::now();
        s.scrapes.push_back((at, Arc::new(sum)));
        // Keep what the longest window needs: the newest scrape at least that old, and after.
        while s.scrapes.len() > 2 && s.scrapes.get(1).is_some_and(|(t, _)| at.duration_since(*t) >= MAX_WINDOW) {
            s.scrapes.pop_front();
        }
        s.failures = failures;
        s.taken += 1;
        s.scraped = scraped;
    }
}

/// `GET http://addr/metrics`: the body, or why not.
async fn fetch(addr: &str) -> Result<String, String> {
    let get = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::get("/metrics")
            .header(hyper::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, get).await.unwrap_or_else(|_| Err("timed out".into()))
}
