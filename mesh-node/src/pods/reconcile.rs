//! What to change so the enrolled pods are exactly the ones wanted: pure,
//! tested with a table.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use super::{PodSpec, PodView};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Enrolled pods to remove: not wanted, or wanted in another namespace path.
    pub unenroll: Vec<String>,
    /// Wanted pods to enroll (after the removals).
    pub enroll: Vec<PodSpec>,
}

/// The pods wanted, each with its reported network namespace; the wanted
/// pods without one go to the second map, with the reason.
pub fn locate(
    wanted: &BTreeSet<String>,
    reported: &BTreeMap<String, PathBuf>,
) -> (BTreeMap<String, PathBuf>, BTreeMap<String, String>) {
    let mut located = BTreeMap::new();
    let mut missing = BTreeMap::new();
    for name in wanted {
        match reported.get(name) {
            Some(netns) => drop(located.insert(name.clone(), netns.clone())),
            None => drop(
                missing.insert(
                    name.clone(),
                    "no network namespace reported for this pod on this node yet (PUT /netns, as a CNI plugin does)"
                        .to_owned(),
                ),
            ),
        }
    }
    (located, missing)
}

pub fn plan(enrolled: &[PodView], desired: &BTreeMap<String, PathBuf>) -> Plan {
    let mut plan = Plan::default();
    let mut kept = Vec::new();
    for pod in enrolled {
        if desired.get(&pod.name) == Some(&pod.netns) {
            kept.push(pod.name.as_str());
        } else {
            plan.unenroll.push(pod.name.clone());
        }
    }
    for (name, netns) in desired {
        if !kept.contains(&name.as_str()) {
            plan.enroll.push(PodSpec { name: name.clone(), netns: netns.clone() });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, netns: &str) -> PodView {
        PodView {
            name: name.into(),
            netns: netns.into(),
            netns_cookie: 1,
            addresses: vec!["10.0.0.1".parse().unwrap()],
            enrolled_at_unix: 0,
        }
    }

    #[test]
    fn plans() {
        // (enrolled, desired, unenroll, enroll)
        type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<(&'a str, &'a str)>, Vec<&'a str>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (vec![], vec![], vec![], vec![]),
            // New pods scheduled here.
            (vec![], vec![("shop/a", "/run/netns/a"), ("shop/b", "/run/netns/b")], vec![], vec!["shop/a", "shop/b"]),
            // In sync: nothing to do.
            (vec![("shop/a", "/run/netns/a")], vec![("shop/a", "/run/netns/a")], vec![], vec![]),
            // A pod no longer wanted (deleted, moved, its namespace left the mesh).
            (
                vec![("shop/a", "/run/netns/a"), ("shop/b", "/run/netns/b")],
                vec![("shop/b", "/run/netns/b")],
                vec!["shop/a"],
                vec![],
            ),
            // A pod recreated with another network namespace: out, then in again.
            (vec![("shop/a", "/run/netns/a")], vec![("shop/a", "/run/netns/a2")], vec!["shop/a"], vec!["shop/a"]),
            // The controller wants nothing here.
            (vec![("shop/a", "/run/netns/a")], vec![], vec!["shop/a"], vec![]),
        ];
        for (enrolled, desired, unenroll, enroll) in cases {
            let enrolled: Vec<PodView> = enrolled.iter().map(|(n, p)| view(n, p)).collect();
            let desired: BTreeMap<String, PathBuf> = desired.iter().map(|(n, p)| (n.to_string(), p.into())).collect();
            let got = plan(&enrolled, &desired);
            assert_eq!(got.unenroll, unenroll, "{enrolled:?} -> {desired:?}");
            assert_eq!(
                got.enroll.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                enroll,
                "{enrolled:?} -> {desired:?}"
            );
        }
    }
}
