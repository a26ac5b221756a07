//! Pods that were running before this agent's CNI plugin was installed had
//! no CNI ADD: nothing reported where their network namespaces are. With
//! `--discover-netns-dir` (the DaemonSet: `/run/netns`, where containerd and
//! CRI-O pin pods' namespaces) the agent finds them itself: it enters each
//! namespace there to read its addresses, and reports a pod the controller
//! places here as living in the one namespace that holds its address.
//!
//! An address held by more than one namespace reports none of them: a wrong
//! guess would capture another pod's traffic under this pod's identity. Such
//! a pod waits for its CNI ADD (or a report through the admin API).
//! [`locate`] decides (pure, table-tested); [`scan`] reads the namespaces.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::netns::Netns;

/// What became of one pod looked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Exactly one namespace holds one of its addresses, and none holds another.
    At(PathBuf),
    /// Namespaces holding its addresses, more than one: reported nowhere.
    Ambiguous(Vec<PathBuf>),
    /// No namespace holds any of its addresses (not started yet, or elsewhere).
    Nowhere,
}

/// Where each of `pods` (name → addresses) lives among `namespaces` (path →
/// addresses), by address. A pod without addresses is found nowhere.
pub fn locate(pods: &BTreeMap<String, Vec<IpAddr>>, namespaces: &[(PathBuf, Vec<IpAddr>)]) -> BTreeMap<String, Found> {
    pods.iter()
        .map(|(name, addresses)| {
            let mut holders: Vec<&PathBuf> = namespaces
                .iter()
                .filter(|(_, held)| addresses.iter().any(|a| held.contains(a)))
                .map(|(path, _)| path)
                .collect();
            holders.dedup();
            let found = match holders.as_slice() {
                [] => Found::Nowhere,
                [one] => Found::At((*one).clone()),
                many => Found::Ambiguous(many.iter().map(|p| (*p).clone()).collect()),
            };
            (name.clone(), found)
        })
        .collect()
}

/// Every network namespace pinned in `dir`, with its addresses. Files that
/// are not namespaces, or that vanish meanwhile, are skipped. Blocking: it
/// enters each namespace on the calling thread.
pub fn scan(dir: &Path) -> Vec<(PathBuf, Vec<IpAddr>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(netns) = Netns::open(&path) else { continue };
        if let Ok(addresses) = netns.addresses() {
            found.push((path, addresses));
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_found_only_in_the_one_namespace_holding_its_address() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let namespaces = vec![
            (PathBuf::from("/run/netns/cni-a"), vec![ip("10.0.0.1"), ip("fd00::1")]),
            (PathBuf::from("/run/netns/cni-b"), vec![ip("10.0.0.2")]),
            (PathBuf::from("/run/netns/cni-c"), vec![ip("10.0.0.3")]),
            (PathBuf::from("/run/netns/other-host-net"), vec![ip("10.0.0.3")]),
            (PathBuf::from("/run/netns/empty"), vec![]),
        ];
        // (pod's addresses, where it is found)
        let cases: Vec<(Vec<IpAddr>, Found)> = vec![
            (vec![ip("10.0.0.1")], Found::At("/run/netns/cni-a".into())),
            // Dual stack: either address finds it, both agree.
            (vec![ip("10.0.0.1"), ip("fd00::1")], Found::At("/run/netns/cni-a".into())),
            (vec![ip("fd00::1")], Found::At("/run/netns/cni-a".into())),
            // Two namespaces hold the address: neither is guessed.
            (
                vec![ip("10.0.0.3")],
                Found::Ambiguous(vec!["/run/netns/cni-c".into(), "/run/netns/other-host-net".into()]),
            ),
            // Its addresses in two different namespaces: neither either.
            (
                vec![ip("10.0.0.1"), ip("10.0.0.2")],
                Found::Ambiguous(vec!["/run/netns/cni-a".into(), "/run/netns/cni-b".into()]),
            ),
            (vec![ip("10.0.0.9")], Found::Nowhere),
            // No address yet (the kubelet has not written status.podIP).
            (vec![], Found::Nowhere),
        ];
        for (addresses, want) in cases {
            let pods = BTreeMap::from([("shop/web".to_owned(), addresses.clone())]);
            assert_eq!(locate(&pods, &namespaces)["shop/web"], want, "{addresses:?}");
        }
    }
}
