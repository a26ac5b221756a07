//! Telemetry through the same reading the controller and `mesh-ctl check`
//! do: Istio's published examples load unchanged; what Istio's admission
//! (and its schema) rejects is rejected with its line and field; what mesh
//! does not honour is said.
use mesh_config::{Document, not_enforced, parse_document};

const HEAD: &str =
    "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: t\n  namespace: istio-system\nspec:\n";

fn doc(text: &str) -> Document {
    Document { file: "telemetry.yaml".into(), line: 3, text: text.into() }
}

#[test]
fn istio_examples_are_accepted() {
    for spec in [
        // Istio's tracing task: the mesh's default, 100 %.
        "  tracing:\n  - providers:\n    - name: \"zipkin\"\n    randomSamplingPercentage: 100.00\n",
        // Custom tags, every kind.
        "  tracing:\n  - customTags:\n      my_tag_header:\n        header:\n          name: x-my-header\n          defaultValue: default\n      \
         my_tag_env:\n        environment:\n          name: MY_ENV\n          defaultValue: default\n      my_tag_literal:\n        literal:\n          value: lit\n",
        // Turning tracing off for a workload.
        "  selector:\n    matchLabels:\n      service.istio.io/canonical-name: frontend\n  tracing:\n  - disableSpanReporting: true\n",
        // Metrics: a metric off, tags removed and added, for a waypoint.
        "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  metrics:\n  - providers:\n    - name: prometheus\n    overrides:\n    \
         - match:\n        metric: REQUEST_COUNT\n        mode: CLIENT_AND_SERVER\n      disabled: true\n    - match: {metric: ALL_METRICS}\n      \
         tagOverrides:\n        request_protocol: {operation: REMOVE}\n        request_host: {value: \"request.host\"}\n    reportingInterval: 15s\n",
        // Access logging: a filter on the response code, and off.
        "  accessLogging:\n  - providers:\n    - name: envoy\n    filter:\n      expression: response.code >= 400\n  - disabled: true\n    match: {mode: CLIENT}\n",
        // The old version and a plain `match`.
        "  tracing:\n  - match: {mode: SERVER}\n    useRequestIdForTraceSampling: true\n",
    ] {
        let text = format!("{HEAD}{spec}");
        if let Err((_, problems)) = parse_document(&doc(&text)) {
            panic!("rejected:\n{text}\n{problems:?}");
        }
        let v1alpha1 = text.replace("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1");
        assert!(parse_document(&doc(&v1alpha1)).is_ok(), "{v1alpha1}");
    }
}

#[test]
fn what_istio_rejects_is_rejected_with_line_and_field() {
    for (spec, field, message) in [
        ("  tracing:\n  - randomSamplingPercentage: 101\n", "spec.tracing[0].randomSamplingPercentage", "[0.0, 100.0]"),
        ("  tracing:\n  - randomSamplingPercentage: -1\n", "spec.tracing[0].randomSamplingPercentage", "[0.0, 100.0]"),
        ("  tracing:\n  - providers: [{name: ''}]\n", "spec.tracing[0].providers[0].name", "may not be empty"),
        (
            "  tracing:\n  - customTags: {a: {literal: {value: ''}}}\n",
            "spec.tracing[0].customTags[a].literal.value",
            "may not be empty",
        ),
        (
            "  tracing:\n  - customTags: {a: {header: {defaultValue: x}}}\n",
            "spec.tracing[0].customTags[a].header.name",
            "may not be empty",
        ),
        (
            "  tracing:\n  - customTags: {a: {literal: {value: x}, header: {name: y}}}\n",
            "spec.tracing[0].customTags[a]",
            "only one",
        ),
        ("  tracing:\n  - match: {mode: BOTH}\n", "spec.tracing[0].match.mode", "expected one of"),
        (
            "  metrics:\n  - overrides: [{match: {metric: REQUESTS}}]\n",
            "spec.metrics[0].overrides[0].match.metric",
            "REQUEST_COUNT",
        ),
        (
            "  metrics:\n  - overrides: [{tagOverrides: {a: {operation: UPSERT}}}]\n",
            "spec.metrics[0].overrides[0].tagOverrides[a].value",
            "UPSERT",
        ),
        (
            "  metrics:\n  - overrides: [{tagOverrides: {a: {operation: REMOVE, value: x}}}]\n",
            "spec.metrics[0].overrides[0].tagOverrides[a].value",
            "REMOVE",
        ),
        (
            "  metrics:\n  - overrides: [{tagOverrides: {a: {operation: DROP}}}]\n",
            "spec.metrics[0].overrides[0].tagOverrides[a].operation",
            "UPSERT or REMOVE",
        ),
        ("  metrics:\n  - reportingInterval: often\n", "spec.metrics[0].reportingInterval", "expected a number"),
        ("  accessLogging:\n  - filter: {expression: ''}\n", "spec.accessLogging[0].filter.expression", "empty"),
        (
            "  accessLogging:\n  - filter: {expression: 'response.code >='}\n",
            "spec.accessLogging[0].filter.expression",
            "not a CEL expression",
        ),
        (
            "  metrics:\n  - overrides: [{tagOverrides: {request_host: {value: 'request.'}}}]\n",
            "spec.metrics[0].overrides[0].tagOverrides[request_host].value",
            "not a CEL expression",
        ),
        (
            "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, group: '', name: a}]\n",
            "spec.selector",
            "only one of",
        ),
        (
            "  tracing:\n  - randomSamplingPercentge: 5\n",
            "spec.tracing[0].randomSamplingPercentge",
            "expected one of `match`, `providers`, `randomSamplingPercentage`",
        ),
    ] {
        let text = format!("{HEAD}{spec}");
        let Err((_, problems)) = parse_document(&doc(&text)) else { panic!("accepted:\n{text}") };
        let p = problems
            .iter()
            .find(|p| p.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("no problem at {field} in {problems:?}\n{text}"));
        assert!(p.message.contains(message), "{field}: {}", p.message);
        assert!(p.to_string().starts_with("telemetry.yaml:"), "{p}");
    }
}

#[test]
fn what_mesh_does_not_honour_is_said() {
    let warned = |spec: &str| {
        let (_, resource) = parse_document(&doc(&format!("{HEAD}{spec}"))).expect("accepted");
        not_enforced(&resource)
    };
    let w = warned("  tracing:\n  - providers: [{name: a}, {name: b}]\n  - randomSamplingPercentage: 5\n");
    assert!(w.iter().any(|(f, m)| f.as_deref() == Some("spec.tracing") && m.contains("first entry")), "{w:?}");
    assert!(w.iter().any(|(f, _)| f.as_deref() == Some("spec.tracing[0].providers")), "{w:?}");
    let w = warned("  targetRefs: [{kind: Deployment, name: web}]\n  tracing: [{randomSamplingPercentage: 5}]\n");
    assert!(w.iter().any(|(f, m)| f.as_deref() == Some("spec.targetRefs[0].kind") && m.contains("nowhere")), "{w:?}");
    let w = warned(
        "  accessLogging: [{providers: [{name: otel-als}]}]\n  metrics:\n  - providers: [{name: stackdriver}]\n    \
         reportingInterval: 15s\n    overrides:\n    - match: {customMetric: my_metric}\n      disabled: true\n    \
         - tagOverrides: {request_host: {value: request.host}, request_protocol: {operation: REMOVE}}\n",
    );
    for field in [
        "spec.accessLogging[0].providers[0]",
        "spec.metrics[0].providers[0]",
        "spec.metrics[0].reportingInterval",
        "spec.metrics[0].overrides[0].match.customMetric",
        "spec.metrics[0].overrides[1].tagOverrides[request_host]",
    ] {
        assert!(w.iter().any(|(f, _)| f.as_deref() == Some(field)), "no warning at {field}: {w:?}");
    }
    assert!(!w.iter().any(|(f, _)| f.as_deref().is_some_and(|f| f.contains("request_protocol"))), "{w:?}");
    // Istio's own examples for the default providers warn of nothing.
    let istio = "  accessLogging: [{providers: [{name: envoy}], filter: {expression: 'response.code >= 400'}}]\n  \
                 metrics: [{providers: [{name: prometheus}], overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]\n";
    assert_eq!(warned(istio), vec![]);
    // A plain tracing Telemetry has nothing to warn about.
    assert_eq!(warned("  tracing:\n  - providers: [{name: zipkin}]\n    randomSamplingPercentage: 10\n"), vec![]);
}
