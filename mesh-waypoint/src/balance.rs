//! Which endpoint takes a request (DestinationRule `loadBalancer`): the
//! order the attempts try the endpoints in, first choice first. Istio's
//! policies: LEAST_REQUEST (its default: the less loaded of two picked at
//! random, Envoy's and linkerd2-proxy's power of two choices), ROUND_ROBIN,
//! RANDOM, and consistent hashing of a header, a cookie, the source address
//! or a query parameter over a ring hash or a Maglev table, so a key keeps
//! its endpoint and only about 1/N of the keys move when an endpoint comes or
//! goes. Beyond Istio, peak-EWMA (linkerd2-proxy's balancer): the power of
//! two choices over each endpoint's latency estimate times its requests in
//! flight. And slow start (`warmup`): an endpoint new to the cluster gets a
//! share that grows over the window, as Envoy weighs it. Pure: the caller
//! gives the load, the times and the random numbers.
use std::{
    hash::{Hash, Hasher},
    net::SocketAddr,
    time::Duration,
};

use mesh_common::api::{self, load_balancer::Simple};
use tokio::time::Instant;

/// A hash of anything, the same in every process of this build
/// (std's SipHash with its fixed keys).
pub fn hash(v: impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    LeastRequest,
    RoundRobin,
    Random,
    /// Consistent hashing; the request's key is found by the caller.
    Hash,
    /// LEAST_REQUEST's two choices, weighed by latency too (the caller's
    /// load is [`PeakEwma::cost`]).
    PeakEwma,
}

pub fn policy(lb: Option<&api::LoadBalancer>) -> Policy {
    match lb {
        Some(lb) if lb.hashed => Policy::Hash,
        Some(lb) if lb.peak_ewma => Policy::PeakEwma,
        Some(lb) => match Simple::try_from(lb.simple) {
            Ok(Simple::RoundRobin) => Policy::RoundRobin,
            Ok(Simple::Random) => Policy::Random,
            // PASSTHROUGH has no meaning for a service's endpoints (warned at check time).
            _ => Policy::LeastRequest,
        },
        None => Policy::LeastRequest,
    }
}

/// Moves the endpoint the policy picks to the front (the others keep their
/// order, the round robin's, for the retries). `endpoints` come in round
/// robin order; `load` is an endpoint's requests in flight (its peak-EWMA
/// cost, for [`Policy::PeakEwma`]); `roll` gives
/// random numbers below its argument; `hashed` is the consistent hash's
/// choice, when there is a key.
pub fn order<T>(
    mut endpoints: Vec<T>,
    policy: Policy,
    load: impl Fn(&T) -> f64,
    mut roll: impl FnMut(usize) -> usize,
    hashed: Option<usize>,
) -> Vec<T> {
    let n = endpoints.len();
    if n < 2 {
        return endpoints;
    }
    let first = match policy {
        Policy::RoundRobin => 0,
        Policy::Random => roll(n),
        Policy::Hash => hashed.unwrap_or_else(|| roll(n)), // no key: any endpoint
        Policy::LeastRequest | Policy::PeakEwma => {
            let a = roll(n);
            let b = (a + 1 + roll(n - 1)) % n; // another one
            if load(&endpoints[b]) < load(&endpoints[a]) { b } else { a }
        }
    };
    let chosen = endpoints.remove(first);
    endpoints.insert(0, chosen);
    endpoints
}

/// Slow start: the first choice, when it is still warming up (`weight`
/// below 1), keeps the request only by that chance (`chance` gives numbers
/// in [0, 1)); else the first endpoint that is not warming up takes it. An
/// endpoint's share of requests so grows with its weight.
pub fn slow_start<T>(mut endpoints: Vec<T>, weight: impl Fn(&T) -> f64, chance: impl FnOnce() -> f64) -> Vec<T> {
    let Some(first) = endpoints.first() else { return endpoints };
    let w = weight(first);
    if w >= 1.0 || chance() < w {
        return endpoints;
    }
    if let Some(i) = endpoints.iter().position(|e| weight(e) >= 1.0) {
        let warm = endpoints.remove(i);
        endpoints.insert(0, warm);
    }
    endpoints
}

/// Envoy's slow-start weight of an endpoint `age` into the window of `lb`:
/// `max(minimum, (max(age, 1 s) / window) ^ (1 / aggression))`, 1 after it.
pub fn warmup_weight(age: Duration, lb: &api::LoadBalancer) -> f64 {
    let window = Duration::from_millis(lb.warmup_ms);
    if window.is_zero() || age >= window {
        return 1.0;
    }
    let time = age.as_secs_f64().max(1.0) / window.as_secs_f64();
    let aggression = if lb.warmup_aggression > 0.0 { lb.warmup_aggression } else { 1.0 };
    time.powf(1.0 / aggression).max(lb.warmup_min_percent / 100.0).min(1.0)
}

/// An endpoint's latency estimate, as linkerd2-proxy's (tower's) peak-EWMA
/// keeps it: a slower answer than the estimate replaces it at once (the
/// peak); a faster one is averaged in with a weight that grows with the time
/// since the last; and the estimate decays while no answer comes, so an
/// endpoint that was slow is tried again.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    rtt_ns: f64,
    at: Instant,
}

/// linkerd2-proxy's defaults: the decay's time constant, and the estimate of
/// an endpoint not yet heard from.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
pub const EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);

impl PeakEwma {
    pub fn new(now: Instant) -> PeakEwma {
        PeakEwma { rtt_ns: EWMA_DEFAULT_RTT.as_nanos() as f64, at: now }
    }

    /// Counts an answer that took `rtt`.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let kept = decay(now.saturating_duration_since(self.at));
        self.rtt_ns = if rtt > self.rtt_ns { rtt } else { self.rtt_ns * kept + rtt * (1.0 - kept) };
        self.at = now;
    }

    /// What a request would cost at `now` with `in_flight` requests already
    /// there: the decayed estimate times one more than those.
    pub fn cost(&self, in_flight: u32, now: Instant) -> f64 {
        let rtt = self.rtt_ns * decay(now.saturating_duration_since(self.at));
        rtt.max(1.0) * f64::from(in_flight + 1)
    }
}

/// The share of an estimate kept after `elapsed`.
fn decay(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
}

/// A consistent-hash table over a set of endpoints.
#[derive(Debug)]
pub enum Table {
    /// Points on a ring, sorted.
    Ring(Vec<(u64, SocketAddr)>),
    /// Maglev's lookup table (size a prime).
    Maglev(Vec<SocketAddr>),
}

impl Table {
    /// Over `endpoints` (any order: the table depends only on the set).
    pub fn build(endpoints: &[SocketAddr], maglev: bool, size: u64) -> Table {
        let mut set: Vec<SocketAddr> = endpoints.to_vec();
        set.sort_unstable();
        set.dedup();
        if set.is_empty() {
            return Table::Ring(Vec::new());
        }
        if maglev {
            return Table::Maglev(maglev_table(&set, size.max(2)));
        }
        // Each endpoint's points do not depend on how many endpoints there
        // are (so a change moves keys only to or from the endpoint that came
        // or went): `size` points each, the ring at least `size` long, at
        // most about a million points in all.
        let per = size.clamp(1, (1 << 20) / set.len() as u64).max(1);
        let mut ring: Vec<(u64, SocketAddr)> =
            set.iter().flat_map(|a| (0..per).map(move |i| (hash((a, i)), *a))).collect();
        ring.sort_unstable();
        Table::Ring(ring)
    }

    pub fn lookup(&self, key: u64) -> Option<SocketAddr> {
        match self {
            Table::Ring(ring) if ring.is_empty() => None,
            Table::Ring(ring) => {
                let i = ring.partition_point(|(h, _)| *h < key);
                Some(ring[i % ring.len()].1)
            }
            Table::Maglev(t) => t.get((key % t.len() as u64) as usize).copied(),
        }
    }
}

/// Maglev (Eisenbud et al., 2016): each endpoint fills the table's free
/// slots in its own permutation, in turn, so each gets an even share and a
/// change moves few slots.
fn maglev_table(set: &[SocketAddr], m: u64) -> Vec<SocketAddr> {
    let perms: Vec<(u64, u64)> =
        set.iter().map(|a| (hash((a, "offset")) % m, hash((a, "skip")) % (m - 1) + 1)).collect();
    let mut next = vec![0u64; set.len()];
    let mut table: Vec<Option<usize>> = vec![None; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize].is_some() {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table.into_iter().map(|i| set[i.unwrap_or(0)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (1..=n).map(|i| format!("10.0.0.{i}:8080").parse().unwrap()).collect()
    }

    #[test]
    fn policies_from_the_wire() {
        let lb = |simple: Simple, hashed| api::LoadBalancer { simple: simple.into(), hashed, ..Default::default() };
        for (wire, want) in [
            (None, Policy::LeastRequest),
            (Some(lb(Simple::Default, false)), Policy::LeastRequest),
            (Some(lb(Simple::RoundRobin, false)), Policy::RoundRobin),
            (Some(lb(Simple::Random, false)), Policy::Random),
            (Some(lb(Simple::Passthrough, false)), Policy::LeastRequest),
            (Some(lb(Simple::Default, true)), Policy::Hash),
            (Some(api::LoadBalancer { peak_ewma: true, ..lb(Simple::Default, false) }), Policy::PeakEwma),
            (Some(api::LoadBalancer { peak_ewma: true, ..lb(Simple::Default, true) }), Policy::Hash),
        ] {
            assert_eq!(policy(wire.as_ref()), want, "{wire:?}");
        }
    }

    #[test]
    fn least_request_takes_the_less_loaded_of_two() {
        let eps = vec![0usize, 1, 2];
        let load = |e: &usize| [5.0, 0.0, 9.0][*e];
        // Rolls pick 0 then (0 + 1 + 0) % 3 = 1: endpoint 1 has less load.
        let mut rolls = [0usize, 0].into_iter();
        assert_eq!(order(eps.clone(), Policy::LeastRequest, load, |_| rolls.next().unwrap(), None), [1, 0, 2]);
        // 0 against 2: 0.
        let mut rolls = [0usize, 1].into_iter();
        assert_eq!(order(eps.clone(), Policy::LeastRequest, load, |_| rolls.next().unwrap(), None)[0], 0);
        assert_eq!(order(eps.clone(), Policy::RoundRobin, load, |_| 2, None), [0, 1, 2], "round robin keeps the order");
        assert_eq!(order(eps.clone(), Policy::Random, load, |_| 2, None), [2, 0, 1]);
        assert_eq!(order(eps.clone(), Policy::Hash, load, |_| 0, Some(2)), [2, 0, 1]);
        assert_eq!(order(vec![7], Policy::LeastRequest, load, |_| unreachable!(), None), [7]);
    }

    /// Envoy's slow-start curve: the floor first, then (age / window) ^
    /// (1 / aggression), full weight from the window's end.
    #[test]
    fn warmup_weights() {
        let lb = |min: f64, aggression: f64| api::LoadBalancer {
            warmup_ms: 100_000,
            warmup_min_percent: min,
            warmup_aggression: aggression,
            ..Default::default()
        };
        let secs = Duration::from_secs;
        for (age, lb, want) in [
            (secs(0), lb(10.0, 1.0), 0.1),
            (secs(5), lb(10.0, 1.0), 0.1),
            (secs(50), lb(10.0, 1.0), 0.5),
            (secs(99), lb(10.0, 1.0), 0.99),
            (secs(100), lb(10.0, 1.0), 1.0),
            (secs(0), lb(0.0, 1.0), 0.01),                // under a second counts as one
            (secs(25), lb(0.0, 2.0), 0.5),                // sqrt(0.25)
            (secs(25), lb(0.0, 0.0), 0.25),               // no aggression: linear
            (secs(1), api::LoadBalancer::default(), 1.0), // no window
        ] {
            assert!((warmup_weight(age, &lb) - want).abs() < 1e-9, "{age:?} {lb:?}: {}", warmup_weight(age, &lb));
        }
    }

    #[test]
    fn slow_start_passes_a_warming_endpoint_over_by_chance() {
        let weight = |e: &u32| if *e == 9 { 0.25 } else { 1.0 };
        assert_eq!(slow_start(vec![9, 1, 2], weight, || 0.2), [9, 1, 2], "kept: the roll is under its weight");
        assert_eq!(slow_start(vec![9, 1, 2], weight, || 0.3), [1, 9, 2], "passed over to a warm endpoint");
        assert_eq!(slow_start(vec![1, 9, 2], weight, || unreachable!()), [1, 9, 2], "a warm first choice stays");
        assert_eq!(slow_start(vec![9], weight, || 0.9), [9], "nothing else to take it");
        // Over many requests in round-robin order, its share is about its weight's.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut to_new = 0;
        for i in 0..40_000u32 {
            let mut rr: Vec<u32> = vec![9, 1, 2, 3];
            rr.rotate_left((i % 4) as usize);
            to_new += u32::from(slow_start(rr, weight, || rng.f64())[0] == 9);
        }
        let share = f64::from(to_new) / 40_000.0;
        assert!((0.055..=0.07).contains(&share), "{share}: a quarter of a quarter");
    }

    /// Peak-EWMA: a slow answer raises the estimate at once, fast ones bring
    /// it down over time, idleness decays it; requests in flight multiply
    /// it; on paused time.
    #[tokio::test(start_paused = true)]
    async fn peak_ewma_follows_latency() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        let cost_ms = |e: &PeakEwma, n: u32, at: Instant| e.cost(n, at) / 1e6;
        assert!((cost_ms(&e, 0, t0) - 30.0).abs() < 1e-6, "an endpoint not heard from: 30 ms");
        e.observe(ms(200), t0);
        assert!((cost_ms(&e, 0, t0) - 200.0).abs() < 1e-6, "the peak is taken at once");
        assert!((cost_ms(&e, 2, t0) - 600.0).abs() < 1e-6, "three requests' worth with two in flight");
        e.observe(ms(10), t0 + ms(100));
        let after_one = cost_ms(&e, 0, t0 + ms(100));
        assert!(after_one > 190.0, "one fast answer soon after moves it little: {after_one}");
        let mut t = t0 + ms(100);
        for _ in 0..300 {
            t += ms(200);
            e.observe(ms(10), t);
        }
        let settled = cost_ms(&e, 0, t);
        assert!(settled < 12.0, "a minute of fast answers (6 time constants) brings it down: {settled}");
        let idle = cost_ms(&e, 0, t + Duration::from_secs(30));
        assert!(idle < settled * 0.06, "idle for 3 time constants: {idle}");
    }

    /// A key keeps its endpoint; adding a fourth endpoint moves about a
    /// quarter of the keys, every one of them to the new endpoint; shares
    /// are even. For both tables.
    #[test]
    fn consistent_hashing_moves_about_one_nth() {
        for (maglev, size) in [(false, 1024), (true, 65537)] {
            let three = Table::build(&addrs(3), maglev, size);
            let four = Table::build(&addrs(4), maglev, size);
            let mut reversed = addrs(3);
            reversed.reverse();
            let same = Table::build(&reversed, maglev, size);
            let keys: Vec<u64> = (0..10_000u32).map(|k| hash(("user", k))).collect();
            let (mut moved, mut to_new) = (0, 0);
            let mut shares = std::collections::BTreeMap::new();
            for k in &keys {
                let (before, after) = (three.lookup(*k).unwrap(), four.lookup(*k).unwrap());
                assert_eq!(same.lookup(*k), Some(before), "the table depends only on the set");
                *shares.entry(before).or_insert(0) += 1;
                if before != after {
                    moved += 1;
                    to_new += u32::from(after == addrs(4)[3]);
                }
            }
            // A ring moves keys only to the new endpoint; Maglev nearly so.
            let want = if maglev { moved * 9 / 10 } else { moved };
            assert!(to_new >= want, "maglev {maglev}: {to_new} of {moved} moved keys went to the new endpoint");
            let moved = f64::from(moved) / keys.len() as f64;
            assert!((0.15..=0.35).contains(&moved), "maglev {maglev}: {moved:.3} of the keys moved");
            for (a, n) in shares {
                let share = f64::from(n) / keys.len() as f64;
                assert!((0.2..=0.47).contains(&share), "maglev {maglev}: {a} has {share:.3}");
            }
        }
    }
}
