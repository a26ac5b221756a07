//! The node API over the wire, against the controller process: who gets a
//! node certificate, who gets which workload certificate, which client
//! certificates the TLS handshake refuses, and the configuration stream
//! (snapshot, delta on a file edit, ACK/NACK, resumption).
mod common;

use std::{collections::BTreeMap, fs, time::Duration};

use common::Controller;
use mesh_common::api::{
    self, CertifyRequest, JoinRequest, NodeMessage, node_control_client::NodeControlClient, node_message::Kind as Msg,
};
use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const CONFIG: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {nodeName: node2, serviceAccountName: db}
status: {podIP: 10.0.0.2}
";

struct Mesh {
    c: Controller,
    root: String,
    token: String,
}

impl Mesh {
    fn start(name: &str) -> Mesh {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Mesh {
        // The shared join token (the older way, still honoured when configured).
        let token_file = std::env::temp_dir().join(format!("mesh-join-token-{name}-{}", std::process::id()));
        let _ = fs::remove_file(&token_file);
        let mut args = vec!["--join-token-file", token_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let c = Controller::start(name, &[("mesh.yaml", CONFIG)], &args);
        let state = c.dir.join(".state");
        let root = fs::read_to_string(state.join("ca-cert.pem")).unwrap();
        let token = fs::read_to_string(&token_file).unwrap().trim().to_owned();
        Mesh { c, root, token }
    }

    async fn channel(&self, client: Option<(&str, &str)>) -> Result<Channel, tonic::transport::Error> {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.root)).domain_name("mesh-controller");
        if let Some((cert, key)) = client {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{}", self.c.grpc_addr))?.tls_config(tls)?.connect().await
    }

    async fn client(&self, identity: Option<(&str, &str)>) -> NodeControlClient<Channel> {
        NodeControlClient::new(self.channel(identity).await.expect("TLS to the controller"))
    }

    /// Joins as `node`; returns (certificate PEM, key PEM).
    async fn join(&self, token: &str, node: &str) -> Result<(String, String), tonic::Status> {
        let (key, csr) = key_and_csr();
        let req = JoinRequest { token: token.into(), node: node.into(), csr_pem: csr };
        let resp = self.client(None).await.join(req).await?.into_inner();
        Ok((resp.cert_pem, key))
    }

    async fn certify(&self, me: (&str, &str), identity: &str) -> Result<api::CertificateResponse, tonic::Status> {
        let (_, csr) = key_and_csr();
        let req = CertifyRequest { identity: identity.into(), csr_pem: csr };
        Ok(self.client(Some(me)).await.certify(req).await?.into_inner())
    }
}

fn key_and_csr() -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default().serialize_request(&key).unwrap();
    (key.serialize_pem(), csr.pem().unwrap())
}

fn uri_san(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = p.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    match &san.value.general_names[0] {
        x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
        other => panic!("{other:?}"),
    }
}

/// A node certificate for `node1` signed by `issuer`, valid in `[from, to]`.
fn node_cert(issuer: &Issuer<'_, KeyPair>, from: OffsetDateTime, to: OffsetDateTime) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names =
        vec![SanType::URI("spiffe://cluster.local/mesh/node/node1".to_string().try_into().unwrap())];
    params.not_before = from;
    params.not_after = to;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

/// A call with this client certificate fails: at the handshake, or refused.
async fn refused(m: &Mesh, identity: (&str, &str)) -> String {
    let result = match m.channel(Some(identity)).await {
        Err(e) => return format!("{e:?}"),
        Ok(channel) => {
            let req =
                CertifyRequest { identity: "spiffe://cluster.local/ns/shop/sa/web".into(), csr_pem: key_and_csr().1 };
            NodeControlClient::new(channel).certify(req).await
        }
    };
    match result {
        Ok(_) => panic!("the controller served a client it should refuse"),
        Err(status) => format!("{:?}: {}", status.code(), status.message()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_joined_nodes_get_certificates_and_only_for_their_pods() {
    let m = Mesh::start("nodeauth");

    // Without the right token, nothing.
    for (token, node, code, want) in [
        ("wrong", "node1", Code::Unauthenticated, "invalid join token"),
        ("", "node1", Code::Unauthenticated, "invalid join token"),
        (m.token.as_str(), "Node/1", Code::InvalidArgument, "invalid node name"),
    ] {
        let err = m.join(token, node).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(want), "{err:?}");
    }

    let (cert, key) = m.join(&m.token, "node1").await.unwrap();
    assert_eq!(uri_san(&cert), "spiffe://cluster.local/mesh/node/node1");
    let node1 = (cert.as_str(), key.as_str());

    // A workload scheduled on the node: issued, chained to the root.
    let web = m.certify(node1, "spiffe://cluster.local/ns/shop/sa/web").await.unwrap();
    assert_eq!(uri_san(&web.cert_pem), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(web.root_pem, m.root);
    assert_eq!(web.chain_pem.last(), Some(&m.root));

    // A workload on another node, unknown identities, other trust domains: refused.
    for (identity, code, want) in [
        ("spiffe://cluster.local/ns/shop/sa/db", Code::PermissionDenied, "node node1 may not obtain"),
        ("spiffe://cluster.local/ns/shop/sa/ghost", Code::PermissionDenied, "may not obtain"),
        ("spiffe://evil.org/ns/shop/sa/web", Code::PermissionDenied, "not in trust domain cluster.local"),
        ("not-a-spiffe-id", Code::InvalidArgument, "identity"),
    ] {
        let err = m.certify(node1, identity).await.unwrap_err();
        assert_eq!(err.code(), code, "{identity}: {err:?}");
        assert!(err.message().contains(want), "{identity}: {err:?}");
    }

    // Without a client certificate: neither certificates nor configuration.
    let err = m
        .client(None)
        .await
        .certify(CertifyRequest { identity: "spiffe://cluster.local/ns/shop/sa/web".into(), csr_pem: key_and_csr().1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let (tx, rx) = mpsc::channel(1);
    tx.send(NodeMessage { kind: Some(Msg::Hello(api::Hello::default())) }).await.unwrap();
    let err = m.client(None).await.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A workload certificate chains to the root but is not a node identity.
    let (wkey, wcsr) = key_and_csr();
    let wreq = CertifyRequest { identity: "spiffe://cluster.local/ns/shop/sa/web".into(), csr_pem: wcsr };
    let wcert = m.client(Some(node1)).await.certify(wreq).await.unwrap().into_inner().cert_pem;
    let why = refused(&m, (&wcert, &wkey)).await;
    assert!(why.contains("PermissionDenied") && why.contains("not a node identity"), "{why}");

    // A forged node certificate (from a CA of the attacker's) fails the handshake.
    let now = OffsetDateTime::now_utc();
    let forged_ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let forged_ca = ca_params.self_signed(&forged_ca_key).unwrap();
    let forger = Issuer::from_ca_cert_pem(&forged_ca.pem(), forged_ca_key).unwrap();
    let (fcert, fkey) = node_cert(&forger, now - Duration::from_secs(60), now + Duration::from_secs(3600));
    let why = refused(&m, (&fcert, &fkey)).await;
    eprintln!("forged node certificate: {why}");
    assert!(!why.contains("PermissionDenied") && !why.contains("Unauthenticated"), "refused at the handshake: {why}");

    // An expired node certificate from the real CA fails the handshake too.
    let state = m.c.dir.join(".state");
    let ca_key = KeyPair::from_pem(&fs::read_to_string(state.join("ca-key.pem")).unwrap()).unwrap();
    let real = Issuer::from_ca_cert_pem(&m.root, ca_key).unwrap();
    let (ecert, ekey) = node_cert(&real, now - Duration::from_secs(7200), now - Duration::from_secs(3600));
    let why = refused(&m, (&ecert, &ekey)).await;
    eprintln!("expired node certificate: {why}");
    assert!(!why.contains("PermissionDenied") && !why.contains("Unauthenticated"), "refused at the handshake: {why}");
    // ... while the same CA's valid node certificate passes the handshake (the
    // test is not vacuous), and is refused after it: the controller accepts
    // only node certificates it issued itself (their serials), so even its
    // own key cannot mint a node outside the registry.
    let (vcert, vkey) = node_cert(&real, now - Duration::from_secs(60), now + Duration::from_secs(3600));
    let err = m.certify((&vcert, &vkey), "spiffe://cluster.local/ns/shop/sa/web").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no longer valid"), "{err:?}");

    let metrics = m.c.get_text("/metrics");
    let refused_total: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_controller_node_requests_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused_total >= 9.0, "{metrics}");
}

type Stream = (mpsc::Sender<NodeMessage>, tonic::Streaming<api::Update>);

async fn open(m: &Mesh, me: (&str, &str), known: BTreeMap<String, u64>) -> Stream {
    let (tx, rx) = mpsc::channel(4);
    tx.send(NodeMessage { kind: Some(Msg::Hello(api::Hello { known, ..Default::default() })) }).await.unwrap();
    let stream = m.client(Some(me)).await.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    (tx, stream.unwrap().into_inner())
}

async fn next(s: &mut tonic::Streaming<api::Update>) -> api::Update {
    tokio::time::timeout(Duration::from_secs(5), s.message()).await.expect("an update").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_a_snapshot_then_deltas_and_resumes() {
    let m = Mesh::start("stream");
    let (cert, key) = m.join(&m.token, "node1").await.unwrap();
    let me = (cert.as_str(), key.as_str());

    let (tx, mut updates) = open(&m, me, BTreeMap::new()).await;
    let snapshot = next(&mut updates).await;
    assert!(snapshot.full);
    let mut keys: Vec<&str> = snapshot.resources.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["workload/Pod/shop/db", "workload/Pod/shop/web"]);
    let known: BTreeMap<String, u64> = snapshot.resources.iter().map(|r| (r.key.clone(), r.version)).collect();
    tx.send(NodeMessage {
        kind: Some(Msg::Ack(api::Ack { nonce: snapshot.nonce, version: snapshot.version.clone() })),
    })
    .await
    .unwrap();

    // A file edit: only the difference is pushed.
    m.c.write("mesh.yaml", &CONFIG.replace("10.0.0.2", "10.0.0.3"));
    let delta = next(&mut updates).await;
    assert!(!delta.full);
    assert_eq!(delta.resources.len(), 1, "{delta:?}");
    assert_eq!(delta.resources[0].key, "workload/Pod/shop/db");
    assert_ne!(delta.version, snapshot.version);

    // The node rejects it; the controller records why.
    tx.send(NodeMessage { kind: Some(Msg::Nack(api::Nack { nonce: delta.nonce, reason: "test says no".into() })) })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let nodes = m.c.get("/debug/nodes");
        if nodes["nodes"]["node1"]["last_nack"] == "test says no" {
            assert_eq!(nodes["nodes"]["node1"]["version_acked"], snapshot.version.as_str());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "NACK not recorded: {nodes}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((tx, updates));

    // Reconnecting with what it held (the snapshot): only the change comes.
    let (_tx, mut updates) = open(&m, me, known).await;
    let resumed = next(&mut updates).await;
    assert!(!resumed.full);
    let keys: Vec<&str> = resumed.resources.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["workload/Pod/shop/db"]);
    assert_eq!(resumed.version, delta.version);
}

/// An ACK that arrives after a newer update went out still counts: the
/// controller records the version the node acknowledged, not nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_still_counts() {
    let m = Mesh::start("late-ack");
    let (cert, key) = m.join(&m.token, "node1").await.unwrap();
    let (tx, mut updates) = open(&m, (&cert, &key), BTreeMap::new()).await;
    let snapshot = next(&mut updates).await;
    // A newer update is on the wire before the node acknowledges the snapshot.
    m.c.write("mesh.yaml", &CONFIG.replace("10.0.0.2", "10.0.0.3"));
    let delta = next(&mut updates).await;
    assert_ne!(delta.version, snapshot.version);
    tx.send(NodeMessage {
        kind: Some(Msg::Ack(api::Ack { nonce: snapshot.nonce, version: snapshot.version.clone() })),
    })
    .await
    .unwrap();
    let acked = |want: &str| {
        let nodes = m.c.get("/debug/nodes");
        nodes["nodes"]["node1"]["version_acked"] == want
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !acked(&snapshot.version) {
        assert!(std::time::Instant::now() < deadline, "the late ACK of the snapshot was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then the delta's ACK moves it on.
    tx.send(NodeMessage { kind: Some(Msg::Ack(api::Ack { nonce: delta.nonce, version: delta.version.clone() })) })
        .await
        .unwrap();
    while !acked(&delta.version) {
        assert!(std::time::Instant::now() < deadline, "the delta's ACK was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The serial of the certificate the controller's node API serves now.
fn served_serial(m: &Mesh) -> String {
    let script = format!(
        "openssl s_client -connect {} -servername mesh-controller </dev/null 2>/dev/null | openssl x509 -noout -serial",
        m.c.grpc_addr
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The serving certificate (10 s) is renewed at half-life while the
/// controller runs: a new one for new handshakes, and a stream opened
/// before goes on receiving updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_rotates_under_open_streams() {
    let m = Mesh::start_with("serving", &["--serving-cert-lifetime", "10s"]);
    let (cert, key) = m.join(&m.token, "node1").await.unwrap();
    let (_tx, mut updates) = open(&m, (cert.as_str(), key.as_str()), BTreeMap::new()).await;
    assert!(next(&mut updates).await.full);
    let first = served_serial(&m);
    assert!(first.starts_with("serial="), "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while served_serial(&m) == first {
        assert!(std::time::Instant::now() < deadline, "the serving certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    m.c.write("mesh.yaml", &CONFIG.replace("10.0.0.2", "10.0.0.3"));
    let delta = next(&mut updates).await;
    assert_eq!(delta.resources.len(), 1, "the stream opened before the renewal still gets updates: {delta:?}");
}
