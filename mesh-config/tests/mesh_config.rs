//! Istio's MeshConfig (the `istio` ConfigMap, key `mesh`) through the same
//! reading the controller and `mesh-ctl check` do: Istio's external
//! authorizer examples load unchanged; what istiod refuses is rejected with
//! the file, line and field; what mesh does not read is a warning; a CUSTOM
//! policy naming a provider that is not defined is accepted.
use mesh_config::{Document, not_enforced, parse_document};

const HEAD: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n";

fn doc(text: &str) -> Document {
    Document { file: "mesh.yaml".into(), line: 1, text: text.into() }
}

/// `mesh`'s text, indented into the ConfigMap.
fn config_map(mesh: &str) -> String {
    let body: String = mesh.lines().map(|l| format!("    {l}\n")).collect();
    format!("{HEAD}{body}")
}

#[test]
fn istio_examples_are_accepted() {
    // Istio's external authorization task, both providers, and a tracing provider beside them.
    let mesh = r#"accessLogFile: /dev/stdout
extensionProviders:
- name: "sample-ext-authz-grpc"
  envoyExtAuthzGrpc:
    service: "ext-authz.foo.svc.cluster.local"
    port: "9000"
- name: "sample-ext-authz-http"
  envoyExtAuthzHttp:
    service: "ext-authz.foo.svc.cluster.local"
    port: "8000"
    includeRequestHeadersInCheck: ["x-ext-authz"]
- name: "oauth2-proxy"
  envoyExtAuthzHttp:
    service: "oauth-proxy.oauth2-proxy.svc.cluster.local"
    port: "4180"
    timeout: 1.5s
    failOpen: false
    statusOnError: "500"
    pathPrefix: /oauth2/auth
    includeAdditionalHeadersInCheck: {x-auth-request-redirect: "https://%REQ(:authority)%%REQ(:path)%"}
    headersToUpstreamOnAllow: ["authorization", "path", "x-auth-request-user", "x-auth-request-email", "x-auth-request-access-token"]
    headersToDownstreamOnAllow: ["set-cookie"]
    headersToDownstreamOnDeny: ["content-type", "set-cookie"]
- name: opa
  envoyExtAuthzGrpc: {service: opa.opa.svc.cluster.local, port: 9191, includeRequestBodyInCheck: {maxRequestBytes: 4096}}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: otel
  opentelemetry: {service: opentelemetry-collector.observability.svc.cluster.local, port: 4317, resourceDetectors: {environment: {}}}
- name: otel-http
  opentelemetry:
    service: opentelemetry-collector.observability.svc.cluster.local
    port: 4318
    http: {path: /v1/traces, timeout: 5s, headers: [{name: custom-header, value: custom value}]}
- name: datadog
  datadog: {service: datadog-agent.datadog.svc.cluster.local, port: 8126}
defaultProviders:
  tracing: [zipkin]
"#;
    let text = config_map(mesh);
    let (_, resource) = parse_document(&doc(&text)).unwrap_or_else(|(_, p)| panic!("rejected: {p:?}\n{text}"));
    let warnings = not_enforced(&resource);
    let has = |field: &str, what: &str| warnings.iter().any(|(f, w)| f.as_deref() == Some(field) && w.contains(what));
    assert!(has("data.mesh.accessLogFile", "not read by mesh"), "{warnings:?}");
    assert!(!warnings.iter().any(|(f, _)| f.as_deref().is_some_and(|f| f.contains("zipkin"))), "{warnings:?}");
    assert!(has("data.mesh.extensionProviders[5].opentelemetry.resourceDetectors", "not read"), "{warnings:?}");
    assert!(!warnings.iter().any(|(f, _)| f.as_deref().is_some_and(|f| f.contains("[6]"))), "{warnings:?}");
    assert!(has("data.mesh.extensionProviders[7].datadog", "zipkin and opentelemetry providers only"), "{warnings:?}");
    assert!(
        has("data.mesh.extensionProviders[3].envoyExtAuthzGrpc.includeRequestBodyInCheck", "not its body"),
        "{warnings:?}"
    );
    // Other ConfigMaps are Kubernetes' business: accepted, nothing read.
    let other =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app-config, namespace: shop}\ndata: {mesh: 'not: [yaml'}\n";
    let (_, resource) = parse_document(&doc(other)).expect("any other ConfigMap is accepted");
    assert!(not_enforced(&resource).is_empty());
}

#[test]
fn what_istio_rejects_is_rejected_with_line_and_field() {
    let provider = |body: &str| format!("extensionProviders:\n- name: authz\n  {body}\n");
    for (mesh, field, message) in [
        ("extensionProviders: [{envoyExtAuthzHttp: {service: a.b, port: 80}}]".to_string(), "data.mesh.extensionProviders[0].name", "required"),
        (
            "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80}}\n- {name: a, envoyExtAuthzGrpc: {service: a.b, port: 80}}".into(),
            "data.mesh.extensionProviders[1].name",
            "unique",
        ),
        (provider("zipkinn: {}"), "data.mesh.extensionProviders[0].zipkinn", "unknown field"),
        ("extensionProviders:\n- name: none".into(), "data.mesh.extensionProviders[0]", "sets no provider"),
        (
            provider("envoyExtAuthzHttp: {service: a.b, port: 80}\n  envoyExtAuthzGrpc: {service: a.b, port: 80}"),
            "data.mesh.extensionProviders[0]",
            "exactly one",
        ),
        (provider("envoyExtAuthzHttp: {port: 80}"), "data.mesh.extensionProviders[0].envoyExtAuthzHttp.service", "required"),
        (provider("envoyExtAuthzGrpc: {service: 'a b', port: 80}"), "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.service", "hostname"),
        (provider("envoyExtAuthzGrpc: {service: a.b}"), "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.port", "required"),
        (provider("envoyExtAuthzGrpc: {service: a.b, port: 70000}"), "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.port", "port number"),
        (provider("envoyExtAuthzHttp: {service: a.b, port: 80, timeout: soon}"), "data.mesh.extensionProviders[0].envoyExtAuthzHttp.timeout", "expected a number"),
        (provider("envoyExtAuthzHttp: {service: a.b, port: 80, statusOnError: '42'}"), "data.mesh.extensionProviders[0].envoyExtAuthzHttp.statusOnError", "HTTP status"),
        (provider("envoyExtAuthzHttp: {service: a.b, port: 80, pathPrefix: check}"), "data.mesh.extensionProviders[0].envoyExtAuthzHttp.pathPrefix", "start with '/'"),
        (
            provider("envoyExtAuthzHttp: {service: a.b, port: 80, headersToUpstreamOnAllow: ['bad header']}"),
            "data.mesh.extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow[0]",
            "not a header name",
        ),
        (
            provider("envoyExtAuthzGrpc: {service: a.b, port: 80, includeRequestBodyInCheck: {maxRequestBytes: -1}}"),
            "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes",
            "between 0",
        ),
        ("extensionProviders: [".into(), "data.mesh.extensionProviders", "did not find expected node"),
    ] {
        let text = config_map(&mesh);
        let Err((_, problems)) = parse_document(&doc(&text)) else { panic!("accepted:\n{text}") };
        let p = problems
            .iter()
            .find(|p| p.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("no problem at {field} in {problems:?}\n{text}"));
        assert!(p.message.contains(message), "{field}: {}", p.message);
        assert!(p.to_string().starts_with("mesh.yaml:"), "{p}");
    }
}

#[test]
fn custom_policies_are_accepted_with_any_provider_name() {
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: foo}\n\
                  spec:\n  targetRefs: [{kind: Service, group: '', name: httpbin}]\n  action: CUSTOM\n  \
                  provider: {name: sample-ext-authz-grpc}\n  rules: [{to: [{operation: {paths: ['/headers']}}]}]\n";
    parse_document(&doc(policy)).unwrap_or_else(|(_, p)| panic!("rejected: {p:?}"));
    let without = policy.replace("  provider: {name: sample-ext-authz-grpc}\n", "");
    let Err((_, problems)) = parse_document(&doc(&without)) else { panic!("CUSTOM without a provider accepted") };
    assert!(problems.iter().any(|p| p.field.as_deref() == Some("spec.provider.name")), "{problems:?}");
    let allow = policy.replace("action: CUSTOM", "action: ALLOW");
    let Err((_, problems)) = parse_document(&doc(&allow)) else { panic!("a provider on ALLOW accepted") };
    assert!(problems.iter().any(|p| p.field.as_deref() == Some("spec.provider")), "{problems:?}");
}
