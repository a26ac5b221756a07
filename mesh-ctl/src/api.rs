//! Reading the mesh: the controller's HTTP port (health, nodes, configuration,
//! model) and each node's admin API (config dump, live connections). Every
//! failure says which address was tried and what to do about it.
use std::{fmt, path::Path, time::Duration};

use mesh_common::admin::{ConfigDump, NodeList, NodeStatus};
use serde::Deserialize;
use serde_json::Value;

/// An error for the user: one line, with the address tried and a hint.
#[derive(Debug)]
pub struct CtlError {
    pub message: String,
    pub hint: Option<String>,
}

impl CtlError {
    pub fn new(message: impl Into<String>) -> CtlError {
        CtlError { message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> CtlError {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CtlError {}

pub type Result<T> = std::result::Result<T, CtlError>;

/// What is at the other end, for error messages.
#[derive(Clone, Copy)]
pub enum Peer<'a> {
    Controller,
    Node(&'a str),
}

pub struct Client {
    agent: ureq::Agent,
    pub controller: String,
    /// The nodes' admin token, sent as `Authorization: Bearer`.
    admin_token: Option<String>,
}

impl Client {
    pub fn new(controller: &str, timeout: Duration) -> Client {
        let agent =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
        let controller = controller.trim_end_matches('/');
        let controller =
            if controller.contains("://") { controller.to_owned() } else { format!("http://{controller}") };
        Client { agent, controller, admin_token: None }
    }

    /// Reads the nodes' admin token from `file`, when given.
    pub fn with_admin_token(mut self, file: Option<&Path>) -> Result<Client> {
        let Some(file) = file else { return Ok(self) };
        let text = std::fs::read_to_string(file)
            .map_err(|e| CtlError::new(format!("reading the admin token file {}: {e}", file.display())))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CtlError::new(format!("the admin token file {} is empty", file.display())));
        }
        self.admin_token = Some(token.to_owned());
        Ok(self)
    }

    /// `GET` a JSON document from the controller.
    pub fn controller(&self, path: &str) -> Result<Value> {
        self.get(&format!("{}{path}", self.controller), Peer::Controller)
    }

    /// `GET` a JSON document from a node's admin API at `addr` (`host:port`).
    pub fn node(&self, name: &str, addr: &str, path: &str) -> Result<Value> {
        self.get(&format!("http://{addr}{path}"), Peer::Node(name))
    }

    /// `POST` (or `DELETE`, with `delete`) to the controller; the JSON answer
    /// (`null` for an empty one).
    pub fn controller_change(&self, path: &str, delete: bool) -> Result<Value> {
        let url = format!("{}{path}", self.controller);
        let request = if delete { self.agent.delete(&url).call() } else { self.agent.post(&url).send_empty() };
        self.answer(&url, Peer::Controller, request)
    }

    fn get(&self, url: &str, peer: Peer) -> Result<Value> {
        let mut request = self.agent.get(url);
        if let (Peer::Node(_), Some(token)) = (peer, &self.admin_token) {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.answer(url, peer, request.call())
    }

    /// The JSON of an answer, or an error that says who answered what.
    fn answer(
        &self,
        url: &str,
        peer: Peer,
        response: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let (what, hint) = describe(peer);
        let mut response =
            response.map_err(|e| CtlError::new(format!("cannot reach {what} at {url}: {}", reason(&e))).hint(hint))?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| CtlError::new(format!("reading the answer of {what} at {url}: {}", reason(&e))))?;
        if !status.is_success() {
            let first = body.lines().next().unwrap_or("").trim();
            let error = CtlError::new(format!("{what} at {url} answered {status}: {first}"));
            return Err(match (status.as_u16(), peer) {
                (401 | 403, Peer::Node(_)) => error.hint(
                    "reading a node's admin API from another host needs the token it was started with \
                     (mesh-node --admin-token-file): pass --admin-token-file or MESH_ADMIN_TOKEN_FILE",
                ),
                (403, Peer::Controller) => error.hint("run this mesh-ctl command on the controller's host"),
                _ => error,
            });
        }
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).map_err(|e| {
            CtlError::new(format!("{what} at {url} did not answer JSON ({e})"))
                .hint("is that address really a mesh admin or controller port?")
        })
    }
}

/// Who `peer` is, and what to check when it cannot be reached.
fn describe(peer: Peer) -> (String, &'static str) {
    match peer {
        Peer::Controller => (
            "the controller".to_owned(),
            "is mesh-controller running? Point mesh-ctl at its --metrics-addr with --controller URL or MESH_CONTROLLER",
        ),
        Peer::Node(name) => (
            format!("node {name}"),
            "is mesh-node running there, with --admin-addr on an address this host reaches? Or pass --node-addr HOST:PORT",
        ),
    }
}

/// The innermost cause, which is what a person can act on (e.g. "Connection refused").
fn reason(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        other => other.to_string(),
    }
}

/// A node as the controller lists it (`/debug/nodes`).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct NodeEntry {
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub status: NodeStatus,
}

/// Which nodes a command reads: one by name (through the controller's list),
/// one by address (no controller needed), or every node the controller knows.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NodeSelector {
    /// Only this node (its name, as pods name it in spec.nodeName).
    #[arg(long)]
    pub node: Option<String>,
    /// Read a node's admin API at HOST:PORT directly, without the controller.
    #[arg(long, conflicts_with = "node")]
    pub node_addr: Option<String>,
}

/// A node to read: its name and admin address.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub addr: String,
}

impl Client {
    /// The controller's node list, sorted by name.
    pub fn node_list(&self) -> Result<(String, Vec<NodeEntry>)> {
        let list: NodeList = serde_json::from_value(self.controller("/debug/nodes")?)
            .map_err(|e| CtlError::new(format!("the controller's /debug/nodes: {e}")))?;
        let nodes = list.nodes.into_iter().map(|(name, status)| NodeEntry { name, status }).collect();
        Ok((list.version, nodes))
    }

    /// The nodes `sel` names, with their admin addresses.
    pub fn targets(&self, sel: &NodeSelector) -> Result<Vec<Target>> {
        if let Some(addr) = &sel.node_addr {
            return Ok(vec![Target { name: addr.clone(), addr: addr.clone() }]);
        }
        let (_, nodes) = self.node_list()?;
        let chosen: Vec<&NodeEntry> = match &sel.node {
            Some(name) => {
                let node = nodes.iter().find(|n| &n.name == name).ok_or_else(|| {
                    let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
                    CtlError::new(format!("no node {name:?} has connected to the controller at {}", self.controller))
                        .hint(format!(
                            "known nodes: {}",
                            if known.is_empty() { "none".into() } else { known.join(", ") }
                        ))
                })?;
                vec![node]
            }
            // Waypoints join like nodes but serve no admin API: their routes are in every node's dump.
            None => nodes.iter().filter(|n| n.status.role != "waypoint").collect(),
        };
        if chosen.is_empty() {
            return Err(CtlError::new(format!("no node has connected to the controller at {}", self.controller))
                .hint("start mesh-node with --controller pointing at the controller's node API"));
        }
        chosen
            .into_iter()
            .map(|n| {
                if n.status.admin_addr.is_empty() {
                    Err(CtlError::new(format!("node {} did not announce an admin address", n.name)).hint(
                        "its admin API listens on loopback only: start mesh-node with --admin-addr on a private \
                         address, or run mesh-ctl on that node with --node-addr 127.0.0.1:15000",
                    ))
                } else {
                    Ok(Target { name: n.name.clone(), addr: n.status.admin_addr.clone() })
                }
            })
            .collect()
    }

    /// Every selected node's config dump.
    pub fn dumps(&self, sel: &NodeSelector) -> Result<Vec<(Target, ConfigDump)>> {
        self.targets(sel)?
            .into_iter()
            .map(|t| {
                let dump = self.dump(&t)?;
                Ok((t, dump))
            })
            .collect()
    }

    /// One node's config dump, typed.
    pub fn dump(&self, t: &Target) -> Result<ConfigDump> {
        serde_json::from_value(self.node(&t.name, &t.addr, "/config_dump")?).map_err(|e| {
            CtlError::new(format!("node {}: config dump: {e}", t.name))
                .hint("mesh-ctl and mesh-node should be the same version")
        })
    }
}
