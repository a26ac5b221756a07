//! `mesh-ctl`: what the mesh's nodes see, why a connection is allowed or
//! denied, configuration checks, and namespace enrolment. It reads the
//! controller's HTTP port (`--controller`) and, through the node list there,
//! each node's admin API; `check` works offline.
mod api;
mod check;
mod endpoints;
mod enroll;
mod explain;
mod explain_l7;
mod graph;
mod kubernetes;
mod node;
mod output;
mod route;
mod status;
mod views;
mod waypoint;

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{
    api::{Client, NodeSelector},
    output::Format,
};

#[derive(Parser)]
#[command(
    name = "mesh-ctl",
    version,
    about = "Inspect and operate a mesh: nodes, workloads, policies, certificates, connections",
    after_help = "Examples:\n  mesh-ctl status\n  mesh-ctl workloads --node node1\n  mesh-ctl authz explain --from demo/frontend --to demo/redis:6379\n  mesh-ctl route explain --to demo/backend:80 --header x-tester=yes\n  mesh-ctl check ./config\n  mesh-ctl enroll demo\n\nExit codes: 0 ok; 1 the command found a problem (check) or a denial (authz explain); 2 usage; 3 the command could not run (controller or node unreachable, unknown workload, unreadable file)."
)]
struct Cli {
    /// The controller's HTTP port (its --metrics-addr).
    #[arg(long, global = true, env = "MESH_CONTROLLER", default_value = "http://127.0.0.1:15014")]
    controller: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// A file holding the nodes' admin token (their --admin-token-file), to
    /// read a node's admin API from another host.
    #[arg(long, global = true, env = "MESH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Seconds to wait for each answer from the controller or a node.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Controller health, nodes with their configuration version and last push, rejected objects.
    #[command(after_help = "Examples:\n  mesh-ctl status\n  mesh-ctl status -o json | jq .nodes_in_sync")]
    Status,
    /// Workloads the nodes know: name, namespace, IP, node, identity, protocol (HBONE: in the mesh).
    #[command(after_help = "Examples:\n  mesh-ctl workloads\n  mesh-ctl workloads --node node2 -o yaml")]
    Workloads(NodeSelector),
    /// Services the nodes know, with VIPs, ports and endpoints.
    #[command(after_help = "Examples:\n  mesh-ctl services\n  mesh-ctl services --node-addr 127.0.0.1:15000")]
    Services(NodeSelector),
    /// AuthorizationPolicies the node proxies enforce (compiled), and what they apply to.
    #[command(after_help = "Examples:\n  mesh-ctl policies\n  mesh-ctl policies -o json")]
    Policies(NodeSelector),
    /// Workload certificates the node proxies hold: identity, serial, not-after, chain to the root.
    #[command(after_help = "Examples:\n  mesh-ctl certs\n  mesh-ctl certs --node node1 -o json")]
    Certs(NodeSelector),
    /// Live connections through the node proxies: source, destination, identities, bytes so far.
    #[command(after_help = "Examples:\n  mesh-ctl connections\n  watch -n1 mesh-ctl connections --node node2")]
    Connections(NodeSelector),
    /// One node's whole configuration dump (JSON; -o yaml for YAML).
    #[command(
        after_help = "Examples:\n  mesh-ctl config-dump --node node1\n  mesh-ctl config-dump --node-addr 127.0.0.1:15000 -o yaml"
    )]
    ConfigDump(NodeSelector),
    /// Validate YAML files or directories offline, exactly as the controller would.
    #[command(
        after_help = "Examples:\n  mesh-ctl check ./config\n  mesh-ctl check policy.yaml namespace.yaml -o json\n\nEvery problem is printed as file:line: object: field: message; the exit code is 1 when there is any."
    )]
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Authorization questions.
    #[command(subcommand)]
    Authz(AuthzCmd),
    /// A service's endpoints as its waypoint sees them: outlier detection, requests in flight, circuit breakers.
    #[command(
        after_help = "Examples:\n  mesh-ctl endpoints --service demo/backend\n  mesh-ctl endpoints --service demo/backend -o json"
    )]
    Endpoints {
        /// The service, namespace/name.
        #[arg(long)]
        service: String,
        #[command(flatten)]
        nodes: NodeSelector,
    },
    /// HTTP routes of the services bound to waypoints, in the order the waypoint tries them.
    #[command(after_help = "Examples:\n  mesh-ctl routes\n  mesh-ctl routes demo/backend -o yaml")]
    Routes {
        /// One service (namespace/name); all of them when absent.
        service: Option<String>,
        #[command(flatten)]
        nodes: NodeSelector,
    },
    /// Routing questions.
    #[command(subcommand)]
    Route(RouteCmd),
    /// Declare, bind, inspect and remove waypoints (L7 proxies for a namespace's services).
    #[command(subcommand)]
    Waypoint(WaypointCmd),
    /// Label a namespace ambient in the configuration, and wait until every node has enrolled its pods.
    #[command(after_help = "Examples:\n  mesh-ctl enroll demo\n  mesh-ctl enroll demo --wait 120")]
    Enroll(EnrollArgs),
    /// Remove a namespace's ambient label, and wait until every node has released its pods.
    #[command(after_help = "Examples:\n  mesh-ctl unenroll demo")]
    Unenroll(EnrollArgs),
    /// The nodes allowed to join: add one (a single-use join token), remove one (revoked at once), list them.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Who talks to whom, live: services and workloads with request and connection rates, errors,
    /// p99, bytes, mTLS and policy denials, from the proxies' own metrics (the controller's /graph).
    #[command(
        after_help = "Examples:\n  mesh-ctl graph\n  mesh-ctl graph --namespace demo --window 1m\n  mesh-ctl graph -o svg > mesh.svg\n  mesh-ctl graph -o png --file mesh.png\n  mesh-ctl graph -o dot | dot -Tpdf > mesh.pdf\n\nThe page with the same graph, refreshing itself: http://CONTROLLER/graph"
    )]
    Graph {
        /// The window the rates are over (at most 1m).
        #[arg(long, default_value = "30s")]
        window: String,
        /// Only edges with an end in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Write the drawing (-o dot|svg|png) here instead of to standard output.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  mesh-ctl completion bash > /etc/bash_completion.d/mesh-ctl\n  mesh-ctl completion zsh > \"${fpath[1]}/_mesh-ctl\""
    )]
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum AuthzCmd {
    /// Which policies apply to a connection, which one decides, and the decision, as the destination's proxy makes it.
    #[command(
        after_help = "Examples:\n  mesh-ctl authz explain --from demo/frontend --to demo/backend-1:8080\n  mesh-ctl authz explain --from 10.200.0.9 --to demo/redis:6379 -o json\n  mesh-ctl authz explain --from demo/frontend --to demo/backend:80 --method POST --path /admin -H x-user=ann\n\nWORKLOAD is namespace/name, a name unique in the mesh, or an IP. A service bound to a waypoint is explained as its waypoint decides each request (L7). The exit code is 1 when the connection or request is denied."
    )]
    Explain {
        /// The client: a workload or an IP (an IP of no workload is a client outside the mesh).
        #[arg(long)]
        from: String,
        /// The server and port: WORKLOAD:PORT or IP:PORT ([IPv6]:PORT) for the node proxy's L4
        /// decision; NAMESPACE/SERVICE:PORT of a service bound to a waypoint for the waypoint's L7 one.
        #[arg(long)]
        to: String,
        /// The request's method (L7; default GET).
        #[arg(long)]
        method: Option<String>,
        /// The request's path and query (L7; default /).
        #[arg(long)]
        path: Option<String>,
        /// The Host / :authority (L7; default: the service's host name).
        #[arg(long)]
        authority: Option<String>,
        /// A request header, NAME=VALUE (L7; repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// A JWT the request carries as `Authorization: Bearer` (L7): checked
        /// against the service's RequestAuthentication rules (the signature
        /// only where the rule's keys are inline; the waypoint fetches jwksUri).
        #[arg(long)]
        jwt: Option<String>,
        #[command(flatten)]
        nodes: NodeSelector,
    },
}

#[derive(Subcommand)]
enum WaypointCmd {
    /// Write a waypoint's Gateway (class istio-waypoint) into the configuration, bind the namespace, wait until the nodes use it.
    #[command(
        after_help = "Examples:\n  mesh-ctl waypoint apply -n demo --enroll-namespace\n  mesh-ctl waypoint apply -n demo reviews-wp --for service\n\nThe instances are mesh-waypoint processes (a Deployment on Kubernetes: deploy/waypoint/); apply says how to run one when none does."
    )]
    Apply {
        #[arg(short, long)]
        namespace: String,
        /// The Gateway's name.
        #[arg(default_value = "waypoint")]
        name: String,
        /// What traffic it takes (istio.io/waypoint-for).
        #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all", "none"])]
        for_traffic: String,
        /// Label the namespace istio.io/use-waypoint: NAME, so its services use the waypoint.
        #[arg(long)]
        enroll_namespace: bool,
        /// Give up waiting for the nodes after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// The waypoints, their instances (ready: connected and in sync) and the services bound to them.
    #[command(after_help = "Examples:\n  mesh-ctl waypoint list\n  mesh-ctl waypoint list -n demo -o json")]
    List {
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// One waypoint: each instance and its connection to the controller, the services bound to it.
    #[command(after_help = "Examples:\n  mesh-ctl waypoint status -n demo")]
    Status {
        #[arg(short, long)]
        namespace: String,
        #[arg(default_value = "waypoint")]
        name: String,
    },
    /// Remove a waypoint's Gateway from the configuration, and its namespace binding.
    #[command(after_help = "Examples:\n  mesh-ctl waypoint delete -n demo")]
    Delete {
        #[arg(short, long)]
        namespace: String,
        #[arg(default_value = "waypoint")]
        name: String,
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Register a node and print its join token: single-use, valid for --ttl (default: the controller's --node-token-ttl, 1h).
    #[command(
        after_help = "Examples:\n  mesh-ctl node add node3\n  mesh-ctl node add node3 --ttl 10m --token-file /tmp/node3.token\n\nRun it on the controller's host: the controller takes registry changes only from there."
    )]
    Add {
        name: String,
        #[arg(long)]
        ttl: Option<String>,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Revoke a node: its certificate and token are refused at once, its stream is closed, no workload certificate is issued to it.
    #[command(after_help = "Examples:\n  mesh-ctl node remove node3")]
    Remove { name: String },
    /// The registered nodes: joined or waiting, token state, revoked.
    #[command(after_help = "Examples:\n  mesh-ctl node list\n  mesh-ctl node list -o json")]
    List,
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Which route a request would take at its waypoint and why: the routes tried, weights, subsets, retries, timeouts.
    #[command(
        after_help = "Examples:\n  mesh-ctl route explain --to demo/backend:80 --path /\n  mesh-ctl route explain --to demo/backend:80 --header x-tester=yes -o json\n\nComputed by the waypoint's own matcher on the routes the nodes hold now."
    )]
    Explain {
        /// The service and port: NAMESPACE/SERVICE:PORT.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path and query.
        #[arg(long, default_value = "/")]
        path: String,
        /// The Host / :authority (default: the service's host name).
        #[arg(long)]
        authority: Option<String>,
        /// A request header, NAME=VALUE (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[command(flatten)]
        nodes: NodeSelector,
    },
}

#[derive(clap::Args)]
struct EnrollArgs {
    namespace: String,
    /// Give up waiting for the nodes after this many seconds.
    #[arg(long, default_value_t = 60)]
    wait: u64,
    /// When the controller reads Kubernetes, the Namespace is labelled on
    /// the API server with this kubeconfig (default: in-cluster,
    /// $KUBECONFIG or ~/.kube/config, as kubectl).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

const EXIT_FOUND_PROBLEM: u8 = 1;
const EXIT_ERROR: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match Client::new(&cli.controller, Duration::from_secs(cli.timeout.max(1)))
        .with_admin_token(cli.admin_token_file.as_deref())
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    if cli.output.is_drawing() && !matches!(cli.command, Cmd::Graph { .. }) {
        eprintln!("error: -o dot, svg and png draw `mesh-ctl graph`; this command prints table, json or yaml");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Cmd::Status => status::status(&client),
        Cmd::Workloads(sel) => views::workloads(&client, sel),
        Cmd::Services(sel) => views::services(&client, sel),
        Cmd::Policies(sel) => views::policies(&client, sel),
        Cmd::Certs(sel) => views::certs(&client, sel),
        Cmd::Connections(sel) => views::connections(&client, sel),
        Cmd::ConfigDump(sel) => views::config_dump(&client, sel),
        Cmd::Check { paths } => check::check(paths),
        Cmd::Authz(AuthzCmd::Explain { from, to, method, path, authority, headers, jwt, nodes }) => {
            let given =
                method.is_some() || path.is_some() || authority.is_some() || !headers.is_empty() || jwt.is_some();
            route::parse_headers(headers).and_then(|mut headers| {
                if let Some(token) = jwt {
                    headers.push(("authorization".into(), format!("Bearer {token}")));
                }
                let request = explain_l7::Request {
                    method: method.clone().unwrap_or_else(|| "GET".into()),
                    path: path.clone().unwrap_or_else(|| "/".into()),
                    authority: authority.clone(),
                    headers,
                };
                explain::explain(&client, nodes, from, to, &request, given)
            })
        }
        Cmd::Routes { service, nodes } => route::routes(&client, nodes, service.as_deref()),
        Cmd::Endpoints { service, nodes } => endpoints::endpoints(&client, nodes, service),
        Cmd::Waypoint(WaypointCmd::Apply { namespace, name, for_traffic, enroll_namespace, wait }) => {
            let a = waypoint::Apply {
                namespace,
                name,
                for_traffic,
                enroll_namespace: *enroll_namespace,
                timeout: Duration::from_secs(*wait),
            };
            waypoint::apply(&client, &a)
        }
        Cmd::Waypoint(WaypointCmd::List { namespace }) => waypoint::list(&client, namespace.as_deref()),
        Cmd::Waypoint(WaypointCmd::Status { namespace, name }) => waypoint::status(&client, namespace, name),
        Cmd::Waypoint(WaypointCmd::Delete { namespace, name, wait }) => {
            waypoint::delete(&client, namespace, name, Duration::from_secs(*wait))
        }
        Cmd::Route(RouteCmd::Explain { to, method, path, authority, headers, nodes }) => route::parse_headers(headers)
            .and_then(|headers| {
                let req = route::Request { to, method, path, authority: authority.as_deref(), headers: &headers };
                route::explain(&client, nodes, &req)
            }),
        Cmd::Enroll(a) => {
            enroll::enroll(&client, &a.namespace, true, Duration::from_secs(a.wait), a.kubeconfig.as_deref())
        }
        Cmd::Unenroll(a) => {
            enroll::enroll(&client, &a.namespace, false, Duration::from_secs(a.wait), a.kubeconfig.as_deref())
        }
        Cmd::Node(NodeCmd::Add { name, ttl, token_file }) => {
            node::add(&client, name, ttl.as_deref(), token_file.as_deref())
        }
        Cmd::Node(NodeCmd::Remove { name }) => node::remove(&client, name),
        Cmd::Node(NodeCmd::List) => node::list(&client),
        Cmd::Graph { window, namespace, file } => {
            let q = graph::Query { window, namespace: namespace.as_deref() };
            graph::graph(&client, &q, cli.output, file.as_deref())
        }
        Cmd::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "mesh-ctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = out.write_all(report.render(cli.output).as_bytes());
            if report.failed { ExitCode::from(EXIT_FOUND_PROBLEM) } else { ExitCode::SUCCESS }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
