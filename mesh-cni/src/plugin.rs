//! The CNI protocol's side of the plugin, as pure functions: what the
//! runtime gives (environment, network configuration on stdin) and what
//! the plugin answers. See the CNI specification, "Chained plugins".
use serde_json::{Value, json};

/// The agent's socket when the network configuration names none.
pub const DEFAULT_SOCKET: &str = "/run/mesh-node/node/cni.sock";

/// Namespaces whose pods start without asking the agent, whether it runs or
/// not: the cluster's own, and mesh's (its controller must start for the
/// agents to have a configuration at all).
pub const DEFAULT_EXCLUDED: &[&str] = &["kube-system", "mesh-system"];

/// This plugin's part of the network configuration.
#[derive(Debug, PartialEq)]
pub struct Conf {
    pub cni_version: String,
    pub socket: String,
    pub excluded: Vec<String>,
    /// The previous plugin's result, passed on unchanged.
    pub prev_result: Option<Value>,
}

impl Conf {
    pub fn parse(stdin: &str) -> Result<Conf, String> {
        let v: Value = serde_json::from_str(stdin).map_err(|e| format!("network configuration: {e}"))?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let excluded = match v.get("exclude_namespaces") {
            Some(list) => list
                .as_array()
                .ok_or("exclude_namespaces: expected a list of names")?
                .iter()
                .map(|n| n.as_str().map(str::to_owned).ok_or("exclude_namespaces: expected names"))
                .collect::<Result<_, _>>()?,
            None => DEFAULT_EXCLUDED.iter().map(|n| (*n).to_owned()).collect(),
        };
        Ok(Conf {
            cni_version: text("cniVersion").unwrap_or_else(|| "1.0.0".into()),
            socket: text("agent_socket").unwrap_or_else(|| DEFAULT_SOCKET.into()),
            excluded,
            prev_result: v.get("prevResult").cloned(),
        })
    }

    /// What ADD prints on success: the previous result, as chained plugins do.
    pub fn result(&self) -> Value {
        let mut result = self.prev_result.clone().unwrap_or_else(|| json!({}));
        if let Some(map) = result.as_object_mut() {
            map.insert("cniVersion".into(), self.cni_version.clone().into());
        }
        result
    }

    /// The CNI error result (code 999: a plugin's own).
    pub fn error(&self, msg: &str, details: &str) -> Value {
        json!({"cniVersion": self.cni_version, "code": 999, "msg": msg, "details": details})
    }
}

/// The pod of `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..`), as `namespace/name`.
pub fn pod(cni_args: &str) -> Option<(String, String)> {
    let arg = |key: &str| {
        cni_args.split(';').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).filter(|v| !v.is_empty())
    };
    Some((arg("K8S_POD_NAMESPACE")?.to_owned(), arg("K8S_POD_NAME")?.to_owned()))
}

/// What ADD does for a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Add {
    /// Not a Kubernetes pod, or an excluded namespace's: nothing to ask.
    PassThrough,
    /// Hand the pod's network namespace to the agent and wait for its answer.
    Enroll { pod: String },
}

pub fn plan_add(conf: &Conf, cni_args: &str) -> Add {
    match pod(cni_args) {
        Some((ns, _)) if conf.excluded.contains(&ns) => Add::PassThrough,
        Some((ns, name)) => Add::Enroll { pod: format!("{ns}/{name}") },
        None => Add::PassThrough,
    }
}

/// The agent's answer to an ADD: the pod may start (`Ok`), or why not.
pub fn outcome(reply: std::io::Result<(u16, String)>, socket: &str) -> Result<(), String> {
    match reply {
        Ok((200, _)) => Ok(()),
        Ok((code, body)) => Err(format!("the mesh's node agent refused the pod (HTTP {code}): {}", body.trim())),
        Err(e) => Err(format!(
            "the mesh's node agent is unreachable at {socket} ({e}): pods outside the excluded namespaces \
             do not start until it runs, so none starts outside the mesh"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_and_the_pod_are_read_as_the_runtime_gives_them() {
        let conf = Conf::parse(
            r#"{"cniVersion":"0.4.0","name":"k8s","type":"mesh-cni","agent_socket":"/s.sock",
                "prevResult":{"cniVersion":"0.4.0","ips":[{"address":"10.0.0.5/24"}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.socket, "/s.sock");
        assert_eq!(conf.excluded, ["kube-system", "mesh-system"]);
        assert_eq!(conf.result()["ips"][0]["address"], "10.0.0.5/24");
        assert!(Conf::parse("{").is_err());
        assert!(Conf::parse(r#"{"exclude_namespaces": "kube-system"}"#).is_err());

        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc";
        assert_eq!(pod(args), Some(("shop".into(), "web-1".into())));
        assert_eq!(pod("IgnoreUnknown=1"), None);
        assert_eq!(pod("K8S_POD_NAMESPACE=;K8S_POD_NAME=x"), None);
    }

    #[test]
    fn only_pods_outside_the_excluded_namespaces_wait_for_the_agent() {
        let conf = Conf::parse("{}").unwrap();
        let cases = [
            ("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a", Add::Enroll { pod: "shop/a".into() }),
            ("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns", Add::PassThrough),
            ("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=mesh-controller-0", Add::PassThrough),
            ("", Add::PassThrough),
        ];
        for (args, want) in cases {
            assert_eq!(plan_add(&conf, args), want, "{args}");
        }
        assert_eq!(outcome(Ok((200, "{}".into())), "/s"), Ok(()));
        assert!(outcome(Ok((503, "not enrolled".into())), "/s").unwrap_err().contains("not enrolled"));
        let down = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(outcome(Err(down), "/s").unwrap_err().contains("unreachable at /s"));
    }
}
