//! `mesh-cni install`: the DaemonSet puts the plugin into the node's CNI
//! configuration, chained after the cluster's own network plugin, the way
//! Istio's and Cilium's chaining modes do. The runtime uses the first
//! configuration file in name order, so that is the one extended; a single
//! plugin's `.conf` becomes a `.conflist` (the `.conf` is set aside, or the
//! runtime would still read it first). Installing twice changes nothing.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

/// The plugin's entry in a configuration list.
pub fn entry(socket: &str) -> Value {
    json!({"type": "mesh-cni", "agent_socket": socket})
}

/// The configuration list `text` (a `.conflist`, or a single plugin's
/// `.conf` when `single`) with the plugin last in its chain.
pub fn chained(text: &str, single: bool, plugin: &Value) -> Result<Value, String> {
    let mut conf: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if single {
        let version = conf.get("cniVersion").cloned().unwrap_or_else(|| "1.0.0".into());
        let name = conf.get("name").cloned().unwrap_or_else(|| "k8s-pod-network".into());
        conf = json!({"cniVersion": version, "name": name, "plugins": [conf]});
    }
    let plugins = conf.get_mut("plugins").and_then(Value::as_array_mut).ok_or("no \"plugins\" list")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some("mesh-cni"));
    plugins.push(plugin.clone());
    Ok(conf)
}

/// The list without the plugin.
pub fn unchained(text: &str) -> Result<Value, String> {
    let mut conf: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let plugins = conf.get_mut("plugins").and_then(Value::as_array_mut).ok_or("no \"plugins\" list")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some("mesh-cni"));
    Ok(conf)
}

/// The configuration file the runtime reads: the first in name order.
fn first_conf(dir: &Path) -> Result<PathBuf, String> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        format!("no CNI configuration in {} yet: install the cluster's network plugin first", dir.display())
    })
}

fn write_atomically(path: &Path, value: &Value) -> Result<(), String> {
    let tmp = path.with_extension("mesh-tmp");
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    fs::write(&tmp, text + "\n").map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Copies this binary into `bin_dir` and chains it into `conf_dir`'s configuration.
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let target = bin_dir.join("mesh-cni");
    let tmp = bin_dir.join(".mesh-cni.tmp");
    fs::copy(&me, &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    let conf = first_conf(conf_dir)?;
    let single = conf.extension().is_some_and(|e| e != "conflist");
    let text = fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    let list = chained(&text, single, &entry(socket)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let written = conf.with_extension("conflist");
    write_atomically(&written, &list)?;
    if single {
        let aside = conf.with_extension("conf.mesh-orig");
        fs::rename(&conf, &aside).map_err(|e| format!("{}: {e}", conf.display()))?;
    }
    Ok(written)
}

/// Takes the plugin out of `conf_dir`'s configuration again (and restores a
/// `.conf` it replaced).
pub fn uninstall(conf_dir: &Path) -> Result<(), String> {
    let conf = first_conf(conf_dir)?;
    let original = conf.with_extension("conf.mesh-orig");
    if original.exists() {
        fs::remove_file(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        return fs::rename(&original, conf.with_extension("conf")).map_err(|e| e.to_string());
    }
    let text = fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    write_atomically(&conf, &unchained(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_goes_last_in_the_chain_once() {
        let plugin = entry("/s.sock");
        let list = r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"ptp"},{"type":"portmap"}]}"#;
        let once = chained(list, false, &plugin).unwrap();
        let types: Vec<&str> =
            once["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ptp", "portmap", "mesh-cni"]);
        let twice = chained(&once.to_string(), false, &entry("/other.sock")).unwrap();
        assert_eq!(twice["plugins"].as_array().unwrap().len(), 3, "installed once");
        assert_eq!(twice["plugins"][2]["agent_socket"], "/other.sock");
        assert_eq!(unchained(&twice.to_string()).unwrap()["plugins"].as_array().unwrap().len(), 2);

        let single = r#"{"cniVersion":"0.4.0","name":"bridge-net","type":"bridge","bridge":"cni0"}"#;
        let wrapped = chained(single, true, &plugin).unwrap();
        assert_eq!(wrapped["name"], "bridge-net");
        assert_eq!(wrapped["cniVersion"], "0.4.0");
        assert_eq!(wrapped["plugins"][0]["type"], "bridge");
        assert_eq!(wrapped["plugins"][1]["type"], "mesh-cni");
        assert!(chained("{\"name\":\"x\"}", false, &plugin).is_err(), "a list without plugins");
    }

    #[test]
    fn install_and_uninstall_edit_the_first_configuration_in_name_order() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-install-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        fs::write(conf.join("10-bridge.conf"), r#"{"cniVersion":"0.4.0","name":"b","type":"bridge"}"#).unwrap();
        fs::write(conf.join("99-other.conflist"), r#"{"name":"o","plugins":[{"type":"x"}]}"#).unwrap();
        let written = install(&bin, &conf, "/s.sock").unwrap();
        assert_eq!(written, conf.join("10-bridge.conflist"));
        assert!(bin.join("mesh-cni").exists());
        assert!(!conf.join("10-bridge.conf").exists(), "the .conf would be read first");
        let list: Value = serde_json::from_str(&fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");
        install(&bin, &conf, "/s.sock").unwrap();
        let again: Value = serde_json::from_str(&fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(again, list, "installing twice changes nothing");
        uninstall(&conf).unwrap();
        assert!(conf.join("10-bridge.conf").exists() && !written.exists(), "the original is back");
        let other = fs::read_to_string(conf.join("99-other.conflist")).unwrap();
        assert!(!other.contains("mesh-cni"), "other files are not touched");
        let _ = fs::remove_dir_all(&dir);
    }
}
