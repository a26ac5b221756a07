//! `mesh-cni`: the mesh's CNI plugin, chained after the cluster's network
//! plugin. On ADD it hands the pod's network namespace to the node agent
//! and returns only once the agent has enrolled the pod (or says it is not
//! captured), so no app starts with its traffic outside the mesh; when the
//! agent cannot be reached the pod's start fails, and the kubelet retries.
//! On DEL it releases the namespace. `mesh-cni install` chains it into the
//! node's CNI configuration (the DaemonSet's init container runs it).
mod agent;
mod install;
mod plugin;

use std::{io::Read as _, path::Path, process::ExitCode, time::Duration};

use plugin::{Add, Conf};
use serde_json::json;

/// Longer than the agent's own wait for an enrolment (20 s).
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("install") | Some("uninstall") => return setup(&args),
        Some("--version") => {
            println!("mesh-cni {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "mesh-cni: unknown command {other:?}; the runtime runs it with CNI_COMMAND set, or: install|uninstall|--version"
            );
            return ExitCode::from(2);
        }
        None => {}
    }
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let command = env("CNI_COMMAND");
    if command == "VERSION" {
        println!("{}", json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}));
        return ExitCode::SUCCESS;
    }
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let conf = match Conf::parse(&stdin) {
        Ok(conf) => conf,
        Err(e) => {
            println!(
                "{}",
                json!({"cniVersion": "1.0.0", "code": 6, "msg": "mesh-cni: bad network configuration", "details": e})
            );
            return ExitCode::FAILURE;
        }
    };
    match command.as_str() {
        "ADD" => match plugin::plan_add(&conf, &env("CNI_ARGS")) {
            Add::PassThrough => succeed(&conf),
            Add::Enroll { pod } => {
                let body = json!({"name": pod, "netns": env("CNI_NETNS")}).to_string();
                let reply = agent::post(&conf.socket, "/cni/add", &body, AGENT_TIMEOUT);
                match plugin::outcome(reply, &conf.socket) {
                    Ok(()) => succeed(&conf),
                    Err(why) => {
                        println!("{}", conf.error(&format!("mesh-cni: pod {pod} not started"), &why));
                        ExitCode::FAILURE
                    }
                }
            }
        },
        "DEL" => {
            // Best effort, and always a success: DEL is repeated, and must
            // succeed for pods the agent never saw (or while it is down).
            if let Add::Enroll { pod } = plugin::plan_add(&conf, &env("CNI_ARGS")) {
                let body = json!({"name": pod, "netns": env("CNI_NETNS")}).to_string();
                let _ = agent::post(&conf.socket, "/cni/del", &body, Duration::from_secs(5));
            }
            ExitCode::SUCCESS
        }
        // CHECK and GC: the agent reconciles its pods itself.
        _ => ExitCode::SUCCESS,
    }
}

fn succeed(conf: &Conf) -> ExitCode {
    println!("{}", conf.result());
    ExitCode::SUCCESS
}

/// `install --bin-dir DIR --conf-dir DIR [--socket PATH]`, `uninstall --conf-dir DIR`.
fn setup(args: &[String]) -> ExitCode {
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let conf_dir = flag("--conf-dir").unwrap_or_else(|| "/etc/cni/net.d".into());
    let result = if args[0] == "install" {
        let bin_dir = flag("--bin-dir").unwrap_or_else(|| "/opt/cni/bin".into());
        let socket = flag("--socket").unwrap_or_else(|| plugin::DEFAULT_SOCKET.into());
        install::install(Path::new(&bin_dir), Path::new(&conf_dir), &socket)
            .map(|file| println!("mesh-cni: chained into {}", file.display()))
    } else {
        install::uninstall(Path::new(&conf_dir)).map(|()| println!("mesh-cni: removed from {conf_dir}"))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-cni {}: {e}", args[0]);
            ExitCode::FAILURE
        }
    }
}
