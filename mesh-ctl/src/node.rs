//! `mesh-ctl node add|remove|list`: the controller's node registry. Each
//! node joins with a token of its own, single-use and short-lived; removing
//! a node revokes it at once (its certificate and token are refused, its
//! stream ends, no workload certificate is issued to it). Changes are taken
//! only on the controller's host.
use std::{
    fmt::Write as _,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{
    api::{Client, CtlError, Result},
    output::{Report, Table, human_duration, rfc3339},
};

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Registers `name` and prints (or writes to `token_file`, mode 0600) its join token.
pub fn add(client: &Client, name: &str, ttl: Option<&str>, token_file: Option<&Path>) -> Result<Report> {
    let path = match ttl {
        Some(ttl) => format!("/nodes/{name}?ttl={ttl}"),
        None => format!("/nodes/{name}"),
    };
    let added = client.controller_change(&path, false)?;
    let token = added["token"].as_str().ok_or_else(|| CtlError::new("the controller answered no token"))?;
    let expires = added["expires_unix"].as_i64().unwrap_or(0);
    let mut text = String::new();
    let where_ = match token_file {
        Some(file) => {
            write_private(file, token)?;
            format!("in {}", file.display())
        }
        None => {
            let _ = writeln!(text, "{token}");
            "above".into()
        }
    };
    let _ = writeln!(
        text,
        "node {name} registered; its join token ({where_}) can be used once, until {} (in {}):\n  \
         mesh-node --controller <host:15012> --node-name {name} --join-token <file with the token> --controller-ca <root PEM>",
        rfc3339(expires),
        human_duration(expires - now())
    );
    let mut data = added;
    if token_file.is_some() {
        data["token"] = Value::Null;
    }
    Ok(Report::new(data, text))
}

fn write_private(file: &Path, token: &str) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .and_then(|mut f| f.write_all(format!("{token}\n").as_bytes()))
        .map_err(|e| CtlError::new(format!("writing the token to {}: {e}", file.display())))
}

/// Revokes `name`.
pub fn remove(client: &Client, name: &str) -> Result<Report> {
    client.controller_change(&format!("/nodes/{name}"), true)?;
    let text = format!(
        "node {name} removed: its certificate and join token are refused from now on, its configuration stream \
         is closed, and no workload certificate is issued to it (those it holds expire on their own)\n"
    );
    Ok(Report::new(serde_json::json!({ "node": name, "removed": true }), text))
}

/// The registry: each node, whether its token is pending, when it joined, revoked.
pub fn list(client: &Client) -> Result<Report> {
    let nodes = client.controller("/nodes")?;
    let now = now();
    let mut table = Table::new(&["NODE", "STATE", "TOKEN", "ADDED", "JOINED", "CERTIFICATES"]);
    for (name, r) in nodes.as_object().into_iter().flatten() {
        let at = |k: &str| r[k].as_i64().unwrap_or(0);
        let ago = |t: i64| if t == 0 { "-".into() } else { format!("{} ago", human_duration(now - t)) };
        let state = if at("revoked_unix") != 0 {
            format!("revoked {}", ago(at("revoked_unix")))
        } else if at("joined_unix") != 0 {
            "joined".into()
        } else {
            "waiting to join".into()
        };
        let token = match (r["token_sha256"].as_str(), at("token_expires_unix")) {
            (Some("pending"), t) if t > now => format!("unused, expires in {}", human_duration(t - now)),
            (Some("pending"), _) => "expired".into(),
            _ => "used".into(),
        };
        let certs = r["serials"].as_array().map_or(0, Vec::len);
        table.row(vec![name.clone(), state, token, ago(at("added_unix")), ago(at("joined_unix")), certs.to_string()]);
    }
    Ok(Report::new(nodes, table.render("no node is registered (mesh-ctl node add NAME)")))
}
