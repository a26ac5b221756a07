//! Local rate limits (Linkerd's `HTTPLocalRateLimitPolicy`, which mesh
//! adopts: Istio has no API for one) at the service's waypoint: a total
//! limit for every client together, a limit for each client identity, and
//! overrides for named service accounts. GCRA buckets from `governor` (a
//! maintained implementation, keyed per identity): each limit lets a burst
//! of one second's requests through, then refills at its rate. A request
//! over a limit is answered 429 with `retry-after`.
use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use mesh_common::{api, identity::SpiffeId};

/// The buckets of one service's policy.
struct Buckets {
    wire: api::RateLimit,
    total: Option<DefaultDirectRateLimiter>,
    identity: Option<DefaultKeyedRateLimiter<String>>,
    /// One keyed limiter per override, with the identities it is for.
    overrides: Vec<(Vec<String>, DefaultKeyedRateLimiter<String>)>,
}

fn quota(rps: u32) -> Option<Quota> {
    NonZeroU32::new(rps).map(Quota::per_second)
}

impl Buckets {
    fn new(wire: &api::RateLimit) -> Buckets {
        Buckets {
            wire: wire.clone(),
            total: quota(wire.total_rps).map(RateLimiter::direct),
            identity: quota(wire.identity_rps).map(RateLimiter::keyed),
            overrides: wire
                .overrides
                .iter()
                .filter_map(|o| Some((o.identities.clone(), RateLimiter::keyed(quota(o.rps)?))))
                .collect(),
        }
    }
}

/// Why a request was refused, and when to come back.
#[derive(Debug, PartialEq, Eq)]
pub struct Limited {
    /// `total`, `identity` or `override`.
    pub limit: &'static str,
    pub policy: String,
    /// Whole seconds, at least 1.
    pub retry_after: u64,
}

#[derive(Default)]
pub struct RateLimits {
    by_service: Mutex<HashMap<String, Arc<Buckets>>>,
}

impl RateLimits {
    /// Takes one request of `service`'s limits for a client with `identity`
    /// (one without: by its address), or says which limit refused it.
    pub fn check(
        &self,
        service: &str,
        wire: Option<&api::RateLimit>,
        identity: Option<&SpiffeId>,
        addr: IpAddr,
    ) -> Result<(), Limited> {
        let Some(wire) = wire else { return Ok(()) };
        let buckets = {
            let mut map = self.by_service.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(service) {
                Some(b) if b.wire == *wire => b.clone(),
                _ => map.entry(service.to_owned()).insert_entry(Arc::new(Buckets::new(wire))).get().clone(),
            }
        };
        let client = identity.map_or_else(|| addr.to_string(), ToString::to_string);
        let refused = |limit: &'static str, not_until: governor::NotUntil<_>| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Limited { limit, policy: wire.policy.clone(), retry_after: wait.as_secs_f64().ceil().max(1.0) as u64 }
        };
        match buckets.overrides.iter().find(|(ids, _)| ids.contains(&client)) {
            Some((_, limiter)) => limiter.check_key(&client).map_err(|n| refused("override", n))?,
            None => {
                if let Some(limiter) = &buckets.identity {
                    limiter.check_key(&client).map_err(|n| refused("identity", n))?;
                }
            }
        }
        if let Some(total) = &buckets.total {
            total.check().map_err(|n| refused("total", n))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
    }

    #[test]
    fn limits_total_per_identity_and_overrides() {
        let limits = RateLimits::default();
        let wire = api::RateLimit {
            policy: "shop/web".into(),
            total_rps: 10,
            identity_rps: 3,
            overrides: vec![api::RateLimitOverride { rps: 5, identities: vec![id("bot").to_string()] }],
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let take = |who: &str| limits.check("shop/web", Some(&wire), Some(&id(who)), ip);
        // A burst of one second's worth each: 3 for a client, 5 for the bot.
        assert!((0..3).all(|_| take("a").is_ok()));
        let refused = take("a").unwrap_err();
        assert_eq!((refused.limit, refused.policy.as_str(), refused.retry_after), ("identity", "shop/web", 1));
        assert!((0..3).all(|_| take("b").is_ok()), "another client has its own bucket");
        assert!((0..4).all(|_| take("bot").is_ok()), "the override's 5 (the total has 4 left)");
        assert_eq!(take("bot").unwrap_err().limit, "total", "10 taken in all");
        assert!(limits.check("shop/other", None, Some(&id("a")), ip).is_ok(), "no policy: no limit");
        // Without an identity, a client is its address.
        assert!(limits.check("shop/anon", Some(&api::RateLimit { identity_rps: 1, ..wire.clone() }), None, ip).is_ok());
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let anon = api::RateLimit { identity_rps: 1, ..wire.clone() };
        assert!(limits.check("shop/anon", Some(&anon), None, ip).is_err());
        assert!(limits.check("shop/anon", Some(&anon), None, other).is_ok());
    }
}
