//! The controller process against a real directory: live reload, rejected
//! objects on its health endpoint, last good version kept.
mod common;

use std::{
    fs,
    time::{Duration, Instant},
};

use common::Controller;

const NAMESPACE: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\nspec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.0.0.1}\n";

#[test]
fn file_edits_apply_live_and_bad_ones_are_reported_without_losing_good_config() {
    let c = Controller::start("live", &[("ns.yaml", NAMESPACE)], &[]);
    let g0 = c.get("/healthz/ready")["generation"].as_u64().unwrap();

    let t = Instant::now();
    c.write("pod.yaml", POD);
    let delay = c.wait_generation(g0, t);
    eprintln!("file edit -> configuration in force: {delay:?}");
    assert!(delay < Duration::from_secs(1), "took {delay:?}");
    let model = c.get("/debug/model");
    let web = &model["workloads"]["Pod/shop/web-1"];
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(web["captured"], true);

    // A broken new version: reported by file, line, object and field; the old one stays.
    let g1 = c.get("/healthz/ready")["generation"].as_u64().unwrap();
    c.write("pod.yaml", &POD.replace("10.0.0.1", "10.0.0.300"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let rejected = loop {
        let r = c.get("/healthz/ready");
        if !r["rejected"].as_array().unwrap().is_empty() {
            break r;
        }
        assert!(Instant::now() < deadline, "the bad file was not reported");
        std::thread::sleep(Duration::from_millis(10));
    };
    let line = rejected["rejected"][0].as_str().unwrap();
    assert!(line.ends_with("pod.yaml:5: Pod shop/web-1: status.podIP: \"10.0.0.300\" is not an IP address"), "{line}");
    assert_eq!(rejected["generation"].as_u64().unwrap(), g1, "nothing in force changed");
    assert_eq!(c.get("/debug/model")["workloads"]["Pod/shop/web-1"]["ips"][0], "10.0.0.1");

    // Deleting the file removes the pod.
    fs::remove_file(c.dir.join("pod.yaml")).unwrap();
    c.wait_generation(g1, Instant::now());
    assert!(c.get("/debug/model")["workloads"].as_object().unwrap().is_empty());
}
