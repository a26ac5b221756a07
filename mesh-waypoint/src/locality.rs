//! Locality-aware balancing (DestinationRule `localityLbSetting`), as Istio
//! configures Envoy: endpoints are ranked by how close their locality
//! (`region/zone/subzone`) is to this waypoint's (`failover` names another
//! region to prefer next, `failoverPriority` ranks by matching labels
//! instead), and requests go to the best rank that has healthy endpoints,
//! spilling over to the next as that rank's health falls (Envoy's
//! overprovisioning factor, 1.4); or `distribute` splits them across
//! localities by weight. Pure: the caller gives the localities, the health
//! and the random numbers.
use std::collections::BTreeMap;

use mesh_common::api;

/// Envoy's default overprovisioning factor: a rank takes all requests while
/// 1/1.4 (~72 %) of its endpoints are healthy.
const OVERPROVISIONING: f64 = 1.4;

/// `region/zone/subzone` (missing parts empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locality<'a> {
    pub region: &'a str,
    pub zone: &'a str,
    pub subzone: &'a str,
}

impl<'a> Locality<'a> {
    pub fn parse(s: &'a str) -> Locality<'a> {
        let mut parts = s.splitn(3, '/');
        Locality {
            region: parts.next().unwrap_or(""),
            zone: parts.next().unwrap_or(""),
            subzone: parts.next().unwrap_or(""),
        }
    }

    /// Istio's locality patterns: `region`, `region/zone`, `region/zone/subzone`,
    /// each part `*` for any, a trailing `/*` for the rest.
    pub fn matches(&self, pattern: &str) -> bool {
        let mut want = pattern.split('/');
        for have in [self.region, self.zone, self.subzone] {
            match want.next() {
                None | Some("*") => return true,
                Some(w) if w == have => {}
                Some(_) => return false,
            }
        }
        true
    }
}

/// An endpoint's rank for a waypoint at `me` (0 is best): by `failoverPriority`
/// labels when set (the number of leading labels whose values differ), else
/// by locality: the same subzone, zone, region, then (with `failover`) the
/// region named for `me`'s, then the rest.
pub fn rank(
    me: Locality<'_>,
    my_labels: &BTreeMap<String, String>,
    ep: Locality<'_>,
    ep_labels: &BTreeMap<String, String>,
    lb: &api::LocalityLb,
) -> u32 {
    if !lb.failover_priority.is_empty() {
        let value = |labels: &BTreeMap<String, String>, l: Locality<'_>, key: &str| -> Option<String> {
            match key {
                "topology.kubernetes.io/region" => Some(l.region.to_owned()).filter(|v| !v.is_empty()),
                "topology.kubernetes.io/zone" => Some(l.zone.to_owned()).filter(|v| !v.is_empty()),
                "topology.istio.io/subzone" => Some(l.subzone.to_owned()).filter(|v| !v.is_empty()),
                _ => None,
            }
            .or_else(|| labels.get(key).cloned())
        };
        let matched = lb
            .failover_priority
            .iter()
            .take_while(|key| {
                let mine = value(my_labels, me, key);
                mine.is_some() && mine == value(ep_labels, ep, key)
            })
            .count();
        return (lb.failover_priority.len() - matched) as u32;
    }
    if ep.region == me.region {
        if ep.zone == me.zone {
            return if ep.subzone == me.subzone { 0 } else { 1 };
        }
        return 2;
    }
    // With a failover region named for this one: it next, then the rest.
    let named = lb.failover.iter().filter(|f| f.from == me.region);
    if named.clone().next().is_none() || named.into_iter().any(|f| f.to == ep.region) { 3 } else { 4 }
}

/// Which rank takes a request, given each rank's endpoints: `(rank, total,
/// healthy)`, best first. Envoy's priority load: the best rank takes
/// `1.4 × its healthy share` of the requests (at most all), the next the
/// same of what is left, and so on; when even all of them together fall
/// short, the loads are scaled up to add to one. `roll` is in [0, 1).
pub fn choose_rank(ranks: &[(u32, usize, usize)], roll: f64) -> Option<u32> {
    let mut left = 1.0;
    let mut loads = Vec::with_capacity(ranks.len());
    for (rank, total, healthy) in ranks {
        let share = if *total == 0 { 0.0 } else { *healthy as f64 / *total as f64 };
        let load = (share * OVERPROVISIONING).min(1.0).min(left);
        left -= load;
        loads.push((*rank, load));
    }
    let sum: f64 = loads.iter().map(|(_, l)| l).sum();
    if sum <= 0.0 {
        return ranks.first().map(|r| r.0); // none healthy: the best rank, as panic routing does
    }
    let mut at = roll * sum;
    for (rank, load) in &loads {
        if at < *load {
            return Some(*rank);
        }
        at -= load;
    }
    loads.iter().rev().find(|(_, l)| *l > 0.0).map(|(r, _)| *r)
}

/// Where a workload is: its locality (`region/zone/subzone`) and labels
/// (`None`: unknown, as an endpoint outside the mesh).
pub type Whereabouts<'a> = Option<(&'a str, &'a BTreeMap<String, String>)>;

/// The healthy endpoints of the locality that takes a request from a
/// waypoint at `here`: `distribute`'s weights when a rule is for `here`;
/// else, with outlier detection in force (`failover`, as Istio requires),
/// the rank Envoy's priority load draws over `all` and `healthy`; else
/// every healthy endpoint. `of` says where an endpoint is; `roll` is in [0, 1).
pub fn restrict<T: Clone>(
    here: Whereabouts<'_>,
    rules: &api::LocalityLb,
    all: &[T],
    healthy: Vec<T>,
    failover: bool,
    of: impl for<'t> Fn(&'t T) -> Whereabouts<'t>,
    roll: f64,
) -> Vec<T> {
    let none = BTreeMap::new();
    let (here, my_labels) = here.map_or((Locality::default(), &none), |(l, labels)| (Locality::parse(l), labels));
    fn locality(w: Whereabouts<'_>) -> Locality<'_> {
        w.map_or(Locality::default(), |(l, _)| Locality::parse(l))
    }
    if !rules.distribute.is_empty() {
        let has = |p: &str| healthy.iter().any(|u| locality(of(u)).matches(p));
        return match choose_distribution(here, rules, has, roll) {
            Some(p) => healthy.into_iter().filter(|u| locality(of(u)).matches(p)).collect(),
            None => healthy,
        };
    }
    if !failover {
        return healthy;
    }
    let rank_of = |u: &T| {
        let at = of(u);
        rank(here, my_labels, locality(at), at.map_or(&none, |(_, labels)| labels), rules)
    };
    let mut ranks = BTreeMap::<u32, (usize, usize)>::new();
    for u in all {
        ranks.entry(rank_of(u)).or_default().0 += 1;
    }
    for u in &healthy {
        ranks.entry(rank_of(u)).or_default().1 += 1;
    }
    let ranks: Vec<(u32, usize, usize)> = ranks.into_iter().map(|(r, (t, h))| (r, t, h)).collect();
    let Some(chosen) = choose_rank(&ranks, roll) else { return healthy };
    let kept: Vec<T> = healthy.iter().filter(|u| rank_of(u) == chosen).cloned().collect();
    if kept.is_empty() { healthy } else { kept }
}

/// `distribute`: the `to` pattern (of the first rule whose `from` matches
/// `me`) that takes a request, by weight among those `available` says have
/// endpoints; `None` when no rule is for `me`.
pub fn choose_distribution<'l>(
    me: Locality<'_>,
    lb: &'l api::LocalityLb,
    available: impl Fn(&str) -> bool,
    roll: f64,
) -> Option<&'l str> {
    let rule = lb.distribute.iter().find(|d| me.matches(&d.from))?;
    let weighted: Vec<(&str, u32)> =
        rule.to.iter().filter(|(p, w)| **w > 0 && available(p)).map(|(p, w)| (p.as_str(), *w)).collect();
    let sum: u32 = weighted.iter().map(|(_, w)| w).sum();
    if sum == 0 {
        return None;
    }
    let mut at = roll * f64::from(sum);
    for (p, w) in &weighted {
        if at < f64::from(*w) {
            return Some(p);
        }
        at -= f64::from(*w);
    }
    weighted.last().map(|(p, _)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(failover: &[(&str, &str)], priority: &[&str]) -> api::LocalityLb {
        api::LocalityLb {
            failover: failover
                .iter()
                .map(|(f, t)| api::LocalityFailover { from: f.to_string(), to: t.to_string() })
                .collect(),
            failover_priority: priority.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn patterns() {
        let l = Locality::parse("us-west/zone1/sub1");
        for (pattern, want) in [
            ("*", true),
            ("us-west", true),
            ("us-west/*", true),
            ("us-west/zone1", true),
            ("us-west/zone1/*", true),
            ("us-west/zone1/sub1", true),
            ("us-west/zone2/*", false),
            ("us-east/*", false),
            ("us-west/zone1/sub2", false),
        ] {
            assert_eq!(l.matches(pattern), want, "{pattern}");
        }
        assert_eq!(Locality::parse("r"), Locality { region: "r", zone: "", subzone: "" });
    }

    #[test]
    fn ranks_by_locality_failover_and_labels() {
        let me = Locality::parse("us-west/zone1/sub1");
        let none = BTreeMap::new();
        let r = |ep: &str, lb: &api::LocalityLb| rank(me, &none, Locality::parse(ep), &none, lb);
        let plain = lb(&[], &[]);
        assert_eq!(
            ["us-west/zone1/sub1", "us-west/zone1/sub2", "us-west/zone2/sub1", "us-east/zone1/sub1"]
                .map(|e| r(e, &plain)),
            [0, 1, 2, 3]
        );
        let failover = lb(&[("us-west", "eu-west"), ("us-east", "us-west")], &[]);
        assert_eq!(r("eu-west/z/s", &failover), 3, "the failover region next");
        assert_eq!(r("us-east/z/s", &failover), 4, "then the rest");
        let other_region_only = lb(&[("us-east", "us-west")], &[]);
        assert_eq!(r("eu-west/z/s", &other_region_only), 3, "no failover named for mine: the rest alike");

        // failoverPriority: how many leading labels match (locality keys read the locality).
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let by_labels = lb(&[], &["topology.istio.io/network", "topology.kubernetes.io/region", "rack"]);
        let mine = labels(&[("topology.istio.io/network", "n1"), ("rack", "r7")]);
        let rl = |ep: &str, l: &[(&str, &str)]| rank(me, &mine, Locality::parse(ep), &labels(l), &by_labels);
        assert_eq!(rl("us-west/z9", &[("topology.istio.io/network", "n1"), ("rack", "r7")]), 0);
        assert_eq!(rl("us-west/z9", &[("topology.istio.io/network", "n1"), ("rack", "r1")]), 1);
        assert_eq!(rl("us-east/z1", &[("topology.istio.io/network", "n1"), ("rack", "r7")]), 2);
        assert_eq!(rl("us-west/z1", &[("topology.istio.io/network", "n2")]), 3);
    }

    /// Envoy's priority load: a rank takes everything while 1/1.4 of it is
    /// healthy, spills the rest to the next below that, and loads are scaled
    /// up when all ranks together are short.
    #[test]
    fn rank_choice_spills_over_as_health_falls() {
        let share = |ranks: &[(u32, usize, usize)], rank: u32| {
            (0..1000).filter(|i| choose_rank(ranks, f64::from(*i) / 1000.0) == Some(rank)).count() as f64 / 1000.0
        };
        let all_healthy = [(0, 4, 4), (2, 4, 4)];
        assert_eq!(share(&all_healthy, 0), 1.0);
        let three_quarters = [(0, 4, 3), (2, 4, 4)];
        assert_eq!(share(&three_quarters, 0), 1.0, "75 % x 1.4 > 100 %");
        let half = [(0, 4, 2), (2, 4, 4)];
        assert!((share(&half, 0) - 0.7).abs() < 0.002, "50 % x 1.4: {}", share(&half, 0));
        let none_local = [(0, 4, 0), (2, 4, 4)];
        assert_eq!(share(&none_local, 2), 1.0, "all to the next rank");
        let both_half = [(0, 4, 2), (3, 4, 2)];
        assert!((share(&both_half, 0) - 0.7).abs() < 0.002, "0.7, and the next the 0.3 left: {}", share(&both_half, 0));
        let degraded = [(0, 10, 2), (3, 10, 2)];
        assert!((share(&degraded, 0) - 0.5).abs() < 0.002, "0.28 and 0.28, scaled up: {}", share(&degraded, 0));
        assert_eq!(choose_rank(&[(1, 3, 0), (4, 2, 0)], 0.9), Some(1), "none healthy: the best rank");
        assert_eq!(choose_rank(&[], 0.5), None);
    }

    /// The whole choice over endpoints: distribute, failover by health, off without outlier detection.
    #[test]
    fn restrict_keeps_the_chosen_locality() {
        let none = BTreeMap::new();
        let eps = ["r/a", "r/a", "r/b"];
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        fn of<'t>(e: &'t &'static str) -> Whereabouts<'t> {
            Some((*e, &EMPTY))
        }
        let here: Whereabouts<'_> = Some(("r/a", &none));
        let failover = lb(&[], &[]);
        assert_eq!(
            restrict(here, &failover, &eps, eps.to_vec(), true, of, 0.99),
            ["r/a", "r/a"],
            "local while healthy"
        );
        assert_eq!(
            restrict(here, &failover, &eps, vec!["r/b"], true, of, 0.0),
            ["r/b"],
            "the next rank once local is down"
        );
        assert_eq!(restrict(here, &failover, &eps, eps.to_vec(), false, of, 0.0), eps, "no outlier detection: all");
        let split = api::LocalityLb {
            distribute: vec![api::LocalityDistribute {
                from: "r/a".into(),
                to: [("r/a".to_string(), 50), ("r/b".to_string(), 50)].into(),
            }],
            ..Default::default()
        };
        assert_eq!(restrict(here, &split, &eps, eps.to_vec(), false, of, 0.7), ["r/b"]);
        assert_eq!(restrict(None, &split, &eps, eps.to_vec(), false, of, 0.7), eps, "no rule for an unknown locality");
    }

    #[test]
    fn distribution_by_weight() {
        let rules = api::LocalityLb {
            distribute: vec![
                api::LocalityDistribute {
                    from: "us-west/zone1/*".into(),
                    to: [("us-west/zone1/*".to_string(), 80), ("us-west/zone2/*".to_string(), 20)].into(),
                },
                api::LocalityDistribute { from: "*".into(), to: [("us-east/*".to_string(), 100)].into() },
            ],
            ..Default::default()
        };
        let me = Locality::parse("us-west/zone1/a");
        let share = |available: &dyn Fn(&str) -> bool, want: &str| {
            (0..1000)
                .filter(|i| choose_distribution(me, &rules, available, f64::from(*i) / 1000.0) == Some(want))
                .count()
        };
        assert_eq!(share(&|_| true, "us-west/zone1/*"), 800);
        assert_eq!(share(&|_| true, "us-west/zone2/*"), 200);
        assert_eq!(
            share(&|p| p != "us-west/zone1/*", "us-west/zone2/*"),
            1000,
            "a locality without endpoints gets none"
        );
        let elsewhere = Locality::parse("eu-west/z/s");
        assert_eq!(
            choose_distribution(elsewhere, &rules, |_| true, 0.3),
            Some("us-east/*"),
            "the next rule's from matches"
        );
        let no_rule = api::LocalityLb { distribute: vec![rules.distribute[0].clone()], ..Default::default() };
        assert_eq!(choose_distribution(elsewhere, &no_rule, |_| true, 0.3), None);
    }
}
