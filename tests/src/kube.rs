//! A real Kubernetes API server (kube-apiserver v1.20.2 and etcd, built by
//! `cargo xtask setup` from Debian's packages) in one of a topology's
//! namespaces. It listens on that namespace's loopback only, so its fixed
//! ports clash with nothing: not another test's server, not a quickstart.
//! There is no kubelet: a test plays its part (binds pods to nodes by
//! `spec.nodeName`, writes `status.podIP`).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
    thread,
    time::{Duration, Instant},
};

use crate::{
    process::{Proc, run_in},
    topology::Topology,
};

/// Where `cargo xtask setup` puts the binaries (`bin/`), outside any clone.
pub const K8S_DIR: &str = "/var/tmp/mesh-tools/k8s-1.20.2";

/// The API server, as its users reach it from inside `netns`.
pub const SERVER: &str = "https://127.0.0.1:6443";

/// A CA, the API server's serving certificate, an admin client certificate
/// (X.509 v3: rustls refuses v1) and the service-account signing key.
const MAKE_PKI: &str = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=mesh-test-ca" 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > server.ext
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
cert() { openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj "$2" 2>/dev/null
         openssl x509 -req -in $1.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $1.crt -days 30 -extfile $3 2>/dev/null; }
cert apiserver "/CN=kube-apiserver" server.ext
cert admin "/CN=admin/O=system:masters" client.ext
"#;

pub struct Kube {
    pub netns: PathBuf,
    pub dir: PathBuf,
    /// An admin kubeconfig for [`SERVER`].
    pub kubeconfig: PathBuf,
    // Dropped in this order: the API server before its etcd.
    apiserver: Option<Proc>,
    apiserver_args: Vec<String>,
    _etcd: Proc,
}

impl Topology {
    /// Starts etcd and kube-apiserver on `netns`'s loopback and waits until
    /// the server is ready (3–4 s here).
    pub fn start_kube(&self, netns: &Path) -> Kube {
        let bin = Path::new(K8S_DIR).join("bin");
        assert!(
            bin.join("kube-apiserver").exists(),
            "no kube-apiserver in {}: run `cargo xtask setup` (it builds one from Debian's source package)",
            bin.display()
        );
        let dir = self.dir.join("kube");
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).expect("kube dir");
        let out = std::process::Command::new("bash").args(["-c", MAKE_PKI]).current_dir(&pki).output().expect("bash");
        assert!(out.status.success(), "making the API server's certificates: {}", String::from_utf8_lossy(&out.stderr));
        let p = |f: &str| pki.join(f).display().to_string();
        let etcd = Proc::spawn_in(
            "etcd",
            netns,
            &[
                bin.join("etcd").to_str().unwrap(),
                "--data-dir",
                dir.join("etcd").to_str().unwrap(),
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--listen-metrics-urls=http://127.0.0.1:2381",
                "--log-level=warn",
                "--logger=zap",
            ],
            &dir.join("etcd.log"),
        );
        let flags = [
            "--etcd-servers=http://127.0.0.1:2379".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=6443".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".to_owned(),
            "--authorization-mode=Node,RBAC".to_owned(),
            "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
            "--profiling=false".to_owned(),
            // No --allow-privileged: nothing in deploy/ may need it.
            // Pods need not name service accounts that exist, nor mount
            // their tokens (there is no controller-manager to make them).
            "--disable-admission-plugins=ServiceAccount".to_owned(),
        ];
        let mut args = vec![bin.join("kube-apiserver").display().to_string()];
        args.extend(flags);
        let kubeconfig = dir.join("admin.kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{SERVER}\", certificate-authority: {}}}\n\
                 users:\n- name: admin\n  user: {{client-certificate: {}, client-key: {}}}\n\
                 contexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                p("ca.crt"),
                p("admin.crt"),
                p("admin.key")
            ),
        )
        .expect("kubeconfig");
        let apiserver = spawn_apiserver(netns, &args, &dir, &pki);
        Kube { netns: netns.into(), dir, kubeconfig, apiserver: Some(apiserver), apiserver_args: args, _etcd: etcd }
    }
}

/// Starts kube-apiserver with `args` and waits until it is ready.
fn spawn_apiserver(netns: &Path, args: &[String], dir: &Path, pki: &Path) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join(format!("apiserver-{}.log", crate::topology::now_millis()));
    let mut apiserver = Proc::spawn_in("kube-apiserver", netns, &args, &log);
    let ca = pki.join("ca.crt").display().to_string();
    let deadline = Instant::now() + crate::patience(Duration::from_secs(60));
    let ready = || {
        let out = run_in(netns, &["curl", "-s", "-m", "2", "--cacert", &ca, &format!("{SERVER}/readyz")]);
        out.stdout.starts_with(b"ok")
    };
    while !ready() {
        assert!(apiserver.is_running(), "kube-apiserver exited:\n{}", apiserver.log_text());
        assert!(Instant::now() < deadline, "kube-apiserver not ready after 60 s:\n{}", apiserver.log_text());
        thread::sleep(Duration::from_millis(100));
    }
    apiserver
}

impl Kube {
    /// Stops the API server (etcd keeps the cluster's state).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.kill();
        }
    }

    /// Starts the API server again, with the same state, and waits until it is ready.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "the API server runs already");
        self.apiserver = Some(spawn_apiserver(&self.netns, &self.apiserver_args, &self.dir, &self.dir.join("pki")));
    }

    /// `kubectl ARGS` against this server; its output, whether it succeeded or not.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut all = vec!["kubectl", "--kubeconfig", self.kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        run_in(&self.netns, &all)
    }

    /// `kubectl ARGS`, which must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`; its output, whether it succeeded or not.
    pub fn apply(&self, yaml: &str) -> Output {
        let file = self.dir.join(format!("apply-{}.yaml", crate::topology::now_millis()));
        fs::write(&file, yaml).expect("writing the manifest");
        self.kubectl(&["apply", "-f", file.to_str().unwrap()])
    }

    pub fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}{}\n{yaml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What deploy/ installs before the controller runs: mesh's CRDs
    /// (`deploy/crds/`, waited for until served) and its namespace
    /// mesh-system, where the controller keeps its CA's Secret, the trust
    /// bundle and its Lease.
    pub fn install_crds_and_namespace(&self) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        self.kubectl_ok(&["apply", "-f", dir.to_str().unwrap()]);
        self.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"]);
        self.apply_ok("apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh-system}\n");
    }

    /// Plays the kubelet: sets a pod's `status.podIP(s)` (the status
    /// subresource, which `kubectl apply` does not write).
    pub fn set_pod_ips(&self, namespace: &str, name: &str, ips: &[std::net::IpAddr]) {
        let list: Vec<String> = ips.iter().map(|ip| format!("{{\"ip\":\"{ip}\"}}")).collect();
        let patch = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{}\",\"podIPs\":[{}]}}}}",
            ips[0],
            list.join(",")
        );
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}/status");
        self.call("PATCH", &path, "application/merge-patch+json", &patch);
    }

    /// Merge-patches the status of the object at API `path` with `patch`
    /// (JSON), as another controller writes it.
    pub fn patch_status(&self, path: &str, patch: &str) {
        self.call("PATCH", &format!("{path}/status"), "application/merge-patch+json", patch);
    }

    /// Plays the kubelet for a node agent's pod: the DaemonSet's pod of
    /// `node` (service account mesh-system/mesh-node, created on first use)
    /// and the projected token the kubelet would mount for it: bound to the
    /// pod, for the controller's audience.
    pub fn node_agent_token(&self, node: &str) -> String {
        self.register_node(node);
        let pod = format!("mesh-node-{node}");
        self.apply_ok(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh-system}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: mesh-node, namespace: mesh-system}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: mesh-system}}\n\
             spec: {{nodeName: {node}, serviceAccountName: mesh-node, containers: [{{name: mesh-node, image: mesh-node}}]}}\n"
        ));
        let uid = self.kubectl_ok(&["get", "pod", "-n", "mesh-system", &pod, "-o", "jsonpath={.metadata.uid}"]);
        self.token_request("mesh-system", "mesh-node", &pod, &uid, "mesh-controller")
    }

    /// Plays the kubelet's registration: the Node `node`, labelled as a
    /// cloud's kubelet labels it: region `test-region`, zone `zone-<node>`.
    pub fn register_node(&self, node: &str) {
        self.apply_ok(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    \
             kubernetes.io/hostname: {node}\n    topology.kubernetes.io/region: test-region\n    \
             topology.kubernetes.io/zone: zone-{node}\n"
        ));
    }

    /// A service-account token from the TokenRequest API, bound to a pod.
    pub fn token_request(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        uid: &str,
        audience: &str,
    ) -> String {
        let body = format!(
            "{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\"spec\":{{\
             \"audiences\":[\"{audience}\"],\"expirationSeconds\":3600,\
             \"boundObjectRef\":{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"name\":\"{pod}\",\"uid\":\"{uid}\"}}}}}}"
        );
        let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token");
        let reply: serde_json::Value =
            serde_json::from_str(&self.call("POST", &path, "application/json", &body)).expect("TokenRequest JSON");
        reply["status"]["token"].as_str().expect("a token").to_owned()
    }

    /// `method path` on the API server as its admin, with `body`; the reply's body.
    fn call(&self, method: &str, path: &str, content_type: &str, body: &str) -> String {
        let pki = self.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let url = format!("{SERVER}{path}");
        let content_type = format!("Content-Type: {content_type}");
        let out = run_in(
            &self.netns,
            &[
                "curl",
                "-sS",
                "-f",
                "-m",
                "10",
                "--cacert",
                &p("ca.crt"),
                "--cert",
                &p("admin.crt"),
                "--key",
                &p("admin.key"),
                "-X",
                method,
                "-H",
                &content_type,
                "--data",
                body,
                &url,
            ],
        );
        assert!(out.status.success(), "{method} {url}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The API server's log, for a failure's message.
    pub fn log_text(&self) -> String {
        self.apiserver.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}
