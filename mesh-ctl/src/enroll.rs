//! `mesh-ctl enroll|unenroll NAMESPACE`: sets or removes the ambient label on
//! the Namespace, in the controller's configuration directory (the file that
//! defines it, or a new one) or, when the controller reads Kubernetes, on the
//! API server with the user's kubeconfig; then waits until every node has
//! enrolled (or released) the namespace's pods.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use mesh_config::split_documents;
use serde_json::{Value, json};
use serde_yaml_ng::Value as Yaml;

use crate::{
    api::{Client, CtlError, NodeSelector, Result},
    output::Report,
};

const LABEL: &str = "istio.io/dataplane-mode";

pub fn enroll(
    client: &Client,
    namespace: &str,
    enroll: bool,
    timeout: Duration,
    kubeconfig: Option<&Path>,
) -> Result<Report> {
    let started = Instant::now();
    let config = client.controller("/debug/config")?;
    let generation = config["generation"].as_u64().unwrap_or(0);
    let edit = if config["source"] == "kubernetes" {
        // The Namespace on the API server, which the controller watches;
        // its problems name it by its API path.
        let changed = crate::kubernetes::label_namespace(kubeconfig, namespace, LABEL, enroll.then_some("ambient"))?;
        changed.then(|| PathBuf::from(format!("/api/v1/namespaces/{namespace}")))
    } else {
        label_in_directory(client, &config, namespace, enroll)?
    };
    if let Some(file) = &edit {
        wait_applied(client, generation, file, started + timeout)?;
    }
    let pods = pods_of(client, namespace, enroll)?;
    wait_nodes(client, namespace, &pods, enroll, started + timeout)?;

    let verb = if enroll { "enrolled" } else { "unenrolled" };
    let how = match &edit {
        Some(file) => format!("label {LABEL} {} in {}", if enroll { "set" } else { "removed" }, file.display()),
        None => format!("the label was already {}", if enroll { "set" } else { "absent" }),
    };
    let text = format!(
        "namespace {namespace} {verb}: {how}; {} pods {} on every node after {:.1}s\n",
        pods.values().map(BTreeSet::len).sum::<usize>(),
        if enroll { "enrolled" } else { "released" },
        started.elapsed().as_secs_f64()
    );
    let data = json!({ "namespace": namespace, "enrolled": enroll, "file": edit, "pods": pods,
        "seconds": started.elapsed().as_secs_f64() });
    Ok(Report::new(data, text))
}

/// Sets or removes the label on the Namespace in the controller's
/// configuration directory (the file defining it, or a new one); the file
/// changed, if any.
fn label_in_directory(client: &Client, config: &Value, namespace: &str, enroll: bool) -> Result<Option<PathBuf>> {
    let value = if enroll { "=ambient" } else { "-" };
    let dir =
        crate::waypoint::config_dir(config, client, &format!("kubectl label namespace {namespace} {LABEL}{value}"))?;
    let key = format!("Namespace {namespace}");
    let existing = config["objects"].as_array().into_iter().flatten().find(|o| o["key"] == key.as_str());
    let edit = match existing {
        Some(o) => {
            let file = PathBuf::from(o["origin"]["file"].as_str().unwrap_or_default());
            let line = o["origin"]["line"].as_u64().unwrap_or(0) as usize;
            set_label_in_file(&file, line, LABEL, enroll.then_some("ambient"))?.then_some(file)
        }
        None if enroll => {
            let file = dir.join(format!("namespace-{namespace}.yaml"));
            let text = format!(
                "# Written by `mesh-ctl enroll {namespace}`.\napiVersion: v1\nkind: Namespace\nmetadata:\n  \
                 name: {namespace}\n  labels:\n    {LABEL}: ambient\n"
            );
            write_atomic(&file, &text)?;
            Some(file)
        }
        None => None, // no Namespace object: nothing is labelled
    };
    Ok(edit)
}

/// Sets label `label` to `want` (`None`: removes it) on the document
/// starting at `line` of `file`. `false`: it already was as wanted. Other
/// documents are kept byte for byte.
pub fn set_label_in_file(file: &Path, line: usize, label: &str, want: Option<&str>) -> Result<bool> {
    let text =
        std::fs::read_to_string(file).map_err(|e| CtlError::new(format!("cannot read {}: {e}", file.display())))?;
    let doc = split_documents(file, &text).into_iter().find(|d| d.line == line).ok_or_else(|| {
        CtlError::new(format!("{}:{line}: the object the controller read there is gone", file.display()))
            .hint("the file changed since; run the command again")
    })?;
    let where_ = format!("{}:{line}", file.display());
    let mut value: Yaml =
        serde_yaml_ng::from_str(&doc.text).map_err(|e| CtlError::new(format!("{where_}: cannot parse: {e}")))?;
    let metadata = value
        .get_mut("metadata")
        .and_then(Yaml::as_mapping_mut)
        .ok_or_else(|| CtlError::new(format!("{where_}: metadata: expected a mapping")))?;
    let labels_key = Yaml::from("labels");
    if !matches!(metadata.get(&labels_key), Some(Yaml::Mapping(_))) {
        metadata.insert(labels_key.clone(), Yaml::Mapping(Default::default()));
    }
    let Some(Yaml::Mapping(labels)) = metadata.get_mut(&labels_key) else { unreachable!("inserted above") };
    let current = labels.get(label).and_then(Yaml::as_str).map(str::to_owned);
    if current.as_deref() == want {
        return Ok(false);
    }
    match want {
        Some(v) => drop(labels.insert(label.into(), v.into())),
        None => drop(labels.remove(label)),
    }
    if labels.is_empty() {
        metadata.remove(&labels_key);
    }
    let body = serde_yaml_ng::to_string(&value).map_err(|e| CtlError::new(format!("{where_}: {e}")))?;
    // Comments leading the document stay; the rest of it is rewritten.
    let comments: String =
        doc.text.lines().take_while(|l| l.trim_start().starts_with('#')).map(|l| format!("{l}\n")).collect();
    write_atomic(file, &replace_document(&text, line, Some(&format!("{comments}{body}"))))?;
    Ok(true)
}

/// `text` with the document starting at `line` replaced by `with` (`None`:
/// removed, with its separator); the other documents byte for byte.
pub fn replace_document(text: &str, line: usize, with: Option<&str>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = line - 1;
    let end = (start..lines.len()).find(|&i| i > start && lines[i].starts_with("---")).unwrap_or(lines.len());
    let mut out: String = lines[..start].iter().map(|l| format!("{l}\n")).collect();
    match with {
        Some(doc) => out.push_str(doc),
        // Removed: its separator goes too (the one after it, or the one before it when it was last).
        None if end < lines.len() => {
            return out + &lines[end + 1..].iter().map(|l| format!("{l}\n")).collect::<String>();
        }
        None => {
            if out.trim_end().ends_with("---") {
                let trimmed = out.trim_end().trim_end_matches("---").to_owned();
                out = trimmed;
            }
            return out;
        }
    }
    for l in &lines[end..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Written beside the target under a hidden name (the controller skips those), then renamed.
pub fn write_atomic(file: &Path, text: &str) -> Result<()> {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = file.with_file_name(format!(".{name}.mesh-ctl"));
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)).map_err(|e| {
        CtlError::new(format!("cannot write {}: {e}", file.display()))
            .hint("run mesh-ctl as the user that owns the configuration directory")
    })
}

/// Waits until the controller has read the change; fails with its complaint
/// when it rejected the file.
pub fn wait_applied(client: &Client, generation: u64, file: &Path, deadline: Instant) -> Result<()> {
    loop {
        let ready = client.controller("/healthz/ready")?;
        if ready["generation"].as_u64().unwrap_or(0) > generation {
            return Ok(());
        }
        let prefix = format!("{}:", file.display());
        if let Some(problem) = ready["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|p| p.starts_with(&prefix))
        {
            return Err(CtlError::new(format!("the controller rejected the change: {problem}")));
        }
        if Instant::now() > deadline {
            return Err(CtlError::new(format!(
                "the controller at {} did not apply {} in time",
                client.controller,
                file.display()
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The namespace's pods by node: those that must be enrolled (enroll) or
/// every pod of the namespace (unenroll: none may stay), but waypoint
/// instances, which speak HBONE themselves and are never enrolled.
fn pods_of(client: &Client, namespace: &str, enroll: bool) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let model = client.controller("/debug/model")?;
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for w in model["workloads"].as_object().into_iter().flatten().map(|(_, w)| w) {
        let (Some(node), Some(name)) = (w["node"].as_str(), w["name"].as_str()) else { continue };
        if w["namespace"] == namespace && w["native_tunnel"] != true && (!enroll || w["captured"] == true) {
            by_node.entry(node.to_owned()).or_default().insert(format!("{namespace}/{name}"));
        }
    }
    Ok(by_node)
}

fn wait_nodes(
    client: &Client,
    namespace: &str,
    pods: &BTreeMap<String, BTreeSet<String>>,
    enroll: bool,
    deadline: Instant,
) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let total: usize = pods.values().map(BTreeSet::len).sum();
    let mut last = String::new();
    let targets = client.targets(&NodeSelector::default())?;
    loop {
        let mut done = 0;
        let mut parts = Vec::new();
        for target in &targets {
            let dump = client.dump(target)?;
            let enrolled: BTreeSet<&str> = dump.pods.iter().map(|p| p.name.as_str()).collect();
            let want = pods.get(&target.name).cloned().unwrap_or_default();
            let ok = want.iter().filter(|p| enrolled.contains(p.as_str()) == enroll).count();
            done += ok;
            if !want.is_empty() {
                parts.push(format!("{} {ok}/{}", target.name, want.len()));
            }
        }
        let line = format!(
            "{} {namespace}: {done}/{total} pods {} ({})",
            if enroll { "enrolling" } else { "unenrolling" },
            if enroll { "enrolled" } else { "released" },
            parts.join(", ")
        );
        if line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last = line;
        }
        if done == total {
            if tty {
                eprintln!();
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            if tty {
                eprintln!();
            }
            return Err(CtlError::new(format!("timed out: {last}"))
                .hint("`mesh-ctl status` shows whether every node is connected and in sync"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::replace_document;

    #[test]
    fn documents_are_replaced_or_removed_keeping_the_others() {
        let text = "a: 1\n---\nb: 2\nc: 3\n---\nd: 4\n";
        assert_eq!(replace_document(text, 3, Some("x: 9\n")), "a: 1\n---\nx: 9\n---\nd: 4\n");
        assert_eq!(replace_document(text, 3, None), "a: 1\n---\nd: 4\n");
        assert_eq!(replace_document(text, 1, None), "b: 2\nc: 3\n---\nd: 4\n");
        assert_eq!(replace_document(text, 6, None), "a: 1\n---\nb: 2\nc: 3\n");
        assert_eq!(replace_document("only: 1\n", 1, None), "");
    }
}
