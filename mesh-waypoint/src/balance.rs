//! Which endpoint takes a request (DestinationRule `loadBalancer`): the
//! order the attempts try the endpoints in, first choice first. Istio's
//! policies: LEAST_REQUEST (its default: the less loaded of two picked at
//! random, Envoy's and linkerd2-proxy's power of two choices), ROUND_ROBIN,
//! RANDOM, and consistent hashing of a header, a cookie, the source address
//! or a query parameter over a ring hash or a Maglev table, so a key keeps
//! its endpoint and only about 1/N of the keys move when an endpoint comes or
//! goes. Pure: the caller gives the load and the random numbers.
use std::{
    hash::{Hash, Hasher},
    net::SocketAddr,
};

use mesh_common::api::{self, load_balancer::Simple};

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
}

pub fn policy(lb: Option<&api::LoadBalancer>) -> Policy {
    match lb {
        Some(lb) if lb.hashed => Policy::Hash,
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
/// robin order; `load` is an endpoint's requests in flight; `roll` gives
/// random numbers below its argument; `hashed` is the consistent hash's
/// choice, when there is a key.
pub fn order<T>(
    mut endpoints: Vec<T>,
    policy: Policy,
    load: impl Fn(&T) -> u32,
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
        Policy::LeastRequest => {
            let a = roll(n);
            let b = (a + 1 + roll(n - 1)) % n; // another one
            match load(&endpoints[a]).cmp(&load(&endpoints[b])) {
                std::cmp::Ordering::Less => a,
                std::cmp::Ordering::Greater => b,
                std::cmp::Ordering::Equal => a,
            }
        }
    };
    let chosen = endpoints.remove(first);
    endpoints.insert(0, chosen);
    endpoints
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
        ] {
            assert_eq!(policy(wire.as_ref()), want, "{wire:?}");
        }
    }

    #[test]
    fn least_request_takes_the_less_loaded_of_two() {
        let eps = vec![0usize, 1, 2];
        let load = |e: &usize| [5, 0, 9][*e];
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
