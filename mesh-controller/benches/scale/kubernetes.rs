//! The scale bench from a real kube-apiserver (v1.20.2 and etcd, the tests'
//! harness, in a network namespace of its own): the directory's objects
//! created through the API (pods' addresses written on their status, as a
//! kubelet does), the controller started with `--kubernetes` once they are
//! all there, and the edit a PATCH of one pod's labels.
use std::{
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{EDITS, Edits, NAMESPACES, Report, Started, namespace_objects, run};

/// Requests in flight while creating the objects.
const CONCURRENCY: usize = 32;

pub fn measure() -> anyhow::Result<Report> {
    let apiserver = Path::new(mesh_tests::kube::K8S_DIR).join("bin/kube-apiserver");
    anyhow::ensure!(apiserver.exists(), "no {} (cargo xtask setup builds it)", apiserver.display());
    let t = mesh_tests::Topology::new("bench-scale");
    let netns = t.node("controller");
    let kube = t.start_kube(&netns);
    kube.install_crds_and_namespace();
    // This thread, the controller it starts and the runtime's threads all
    // live in the API server's namespace: its loopback is theirs. Back home
    // before the topology goes: it kills the processes in its namespaces.
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    enter(&std::fs::File::open(&netns)?)?;
    let result = in_namespace(&t, &kube);
    enter(&home)?;
    result
}

/// Makes `netns` this thread's network namespace.
fn enter(netns: &std::fs::File) -> anyhow::Result<()> {
    // SAFETY: a valid descriptor of a network namespace; this thread only.
    anyhow::ensure!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0, "setns");
    Ok(())
}

fn in_namespace(t: &mesh_tests::Topology, kube: &mesh_tests::kube::Kube) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let client =
        runtime.block_on(mesh_common::kube_client::client(Some(&kube.kubeconfig))).map_err(anyhow::Error::msg)?;

    let created = Instant::now();
    let objects = runtime.block_on(create_all(&client))?;
    let create_seconds = created.elapsed().as_secs_f64();
    eprintln!("created {objects} objects through the API server in {create_seconds:.1} s");

    let state = t.dir.join("controller-state");
    let kubeconfig = kube.kubeconfig.display().to_string();
    let mut controller = Started::spawn(&["--kubernetes", "--kubeconfig", &kubeconfig], &state)?;
    // The leader marks each of the 1000 policies Accepted once: measured
    // apart, then the edits' own requests.
    let marked = Instant::now();
    let status_writes = runtime.block_on(quiet(&client));
    let status_seconds = marked.elapsed().as_secs_f64();
    let before = runtime.block_on(requests(&client));
    let result = runtime.block_on(run(&state, &controller, &Edits::Kubernetes(client.clone()), &[]));
    // The last edit's consequences (status writes, if any) land first.
    std::thread::sleep(Duration::from_secs(2));
    let after = runtime.block_on(requests(&client));
    controller.stop();
    let (mut report, before, after) = (result?, before?, after?);
    // The controller's last reload (a status write's), not its first load:
    // controller_ready_seconds covers listing, parsing and the first model.
    report.remove("config_load_and_model_ms");
    report.insert("apiserver_requests_after_ready_until_quiet".into(), status_writes?.into());
    report.insert("quiet_after_ready_seconds".into(), ((status_seconds * 10.0).round() / 10.0).into());
    report.insert("objects_created_through_the_api".into(), objects.into());
    report.insert("objects_created_seconds".into(), ((create_seconds * 10.0).round() / 10.0).into());
    // From the controller's start to its first full model (listed every kind, built, serving).
    report.insert("controller_ready_seconds".into(), controller.ready.as_secs_f64().into());
    // Its own requests: everything but the bench's edits and reads, and the
    // leader's lease renewals (every 5 s whatever happens).
    let per_edit = after.saturating_sub(before) as f64 / EDITS as f64;
    report.insert("apiserver_requests_per_edit".into(), per_edit.into());
    Ok(report)
}

/// Creates every namespace's objects (mesh-system, where the leader's lease
/// and the CA's Secret live, is installed with the CRDs); the number created.
async fn create_all(client: &Client) -> anyhow::Result<usize> {
    let namespaces: Vec<Value> = (0..NAMESPACES).map(|ns| namespace_objects(ns, 0).remove(0)).collect();
    let mut created = create(client, namespaces).await?;
    let rest: Vec<Value> = (0..NAMESPACES).flat_map(|ns| namespace_objects(ns, 0).into_iter().skip(1)).collect();
    created += create(client, rest).await?;
    Ok(created)
}

async fn create(client: &Client, objects: Vec<Value>) -> anyhow::Result<usize> {
    let results: Vec<anyhow::Result<()>> =
        stream::iter(objects).map(|o| create_one(client, o)).buffer_unordered(CONCURRENCY).collect().await;
    let n = results.len();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(n)
}

/// Creates `object`, then writes its `status` (the kubelet's part for a Pod).
async fn create_one(client: &Client, mut object: Value) -> anyhow::Result<()> {
    let status = object.as_object_mut().and_then(|o| o.remove("status"));
    let api = api_for(client, &object);
    let object: DynamicObject = serde_json::from_value(object)?;
    let name = object.metadata.name.clone().unwrap_or_default();
    api.create(&PostParams::default(), &object).await?;
    if let Some(status) = status {
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await?;
    }
    Ok(())
}

fn api_for(client: &Client, object: &Value) -> Api<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "AuthorizationPolicy" => "authorizationpolicies".to_owned(),
        k => format!("{}s", k.to_ascii_lowercase()),
    };
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// The edit: pod0 of ns0 relabelled (`rev: r<round>`).
pub async fn relabel(client: &Client, round: usize) -> anyhow::Result<()> {
    let pods: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "ns0", &ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()));
    let patch = json!({"metadata": {"labels": {"rev": format!("r{round}")}}});
    pods.patch("pod0", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Waits until the controller has stopped making requests (its count still
/// for two seconds); the requests it made meanwhile.
async fn quiet(client: &Client) -> anyhow::Result<u64> {
    let start = requests(client).await?;
    let mut last = start;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = requests(client).await?;
        if now == last {
            return Ok(now - start);
        }
        last = now;
    }
}

/// Requests the API server has answered, but the bench's own (its edits,
/// these reads of /metrics) and lease renewals.
async fn requests(client: &Client) -> anyhow::Result<u64> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| !l.contains("resource=\"\"") && !l.contains("resource=\"leases\""))
        .filter(|l| !(l.contains("resource=\"pods\"") && l.contains("verb=\"PATCH\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
