//! One document → one typed, validated object, or the problems that stop it.
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::{
    Problem, Resource,
    locate::line_of,
    objects::{Kind, Opaque},
    store::ObjectKey,
    unmodelled, validate,
};
use crate::Document;

/// The object of one document, or its key (when readable) and everything
/// wrong with it (a kind mesh does not read is one problem here).
pub type Parsed = Result<(ObjectKey, Resource), (Option<ObjectKey>, Vec<Problem>)>;

/// What one document is to the configuration.
// Nearly every document is an object: boxing it would cost an allocation each.
#[derive(Clone, Debug)]
pub enum Reading {
    /// Shared: the parse cache, a snapshot and the store hold one copy, and
    /// an unchanged document's object is known unchanged by its pointer.
    Object(ObjectKey, std::sync::Arc<Resource>),
    /// A valid object of a kind mesh does not read (a Deployment, another
    /// project's resource): it has no effect, and the problem is a warning.
    Ignored(Problem),
    Rejected(Option<ObjectKey>, Vec<Problem>),
}

pub fn parse_document(doc: &Document) -> Parsed {
    match read_document(doc) {
        Reading::Object(key, resource) => Ok((key, std::sync::Arc::unwrap_or_clone(resource))),
        Reading::Ignored(problem) => Err((None, vec![problem])),
        Reading::Rejected(key, problems) => Err((key, problems)),
    }
}

pub fn read_document(doc: &Document) -> Reading {
    match read(doc) {
        Ok(Some((key, resource))) => Reading::Object(key, std::sync::Arc::new(resource)),
        Ok(None) => {
            let value: Value = serde_yaml_ng::from_str(&doc.text).unwrap_or_default();
            let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
            let meta = |key: &str| value.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str);
            let kind = text("kind");
            let object = match (meta("namespace"), meta("name")) {
                (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
                (None, Some(name)) => format!("{kind} {name}"),
                _ => kind.clone(),
            };
            Reading::Ignored(Problem {
                file: doc.file.clone(),
                line: doc.line,
                object: Some(object),
                field: Some("kind".into()),
                message: format!(
                    "{kind} ({}) is not a kind mesh reads: accepted, no effect on the mesh",
                    text("apiVersion")
                ),
            })
        }
        Err((key, problems)) => Reading::Rejected(key, problems),
    }
}

/// The object, `None` for a kind mesh does not read, or the problems.
type Outcome = Result<Option<(ObjectKey, Resource)>, (Option<ObjectKey>, Vec<Problem>)>;

fn read(doc: &Document) -> Outcome {
    let problem = |line: usize, object: Option<String>, field: Option<&str>, message: String| Problem {
        file: doc.file.clone(),
        line,
        object,
        field: field.map(str::to_owned),
        message,
    };
    // 1. YAML syntax, and the type fields every object has.
    let value: Value = serde_yaml_ng::from_str(&doc.text).map_err(|e| {
        let line = doc.line + e.location().map_or(0, |l| l.line().saturating_sub(1));
        (None, vec![problem(line, None, None, format!("invalid YAML: {}", strip_location(&e.to_string())))])
    })?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind_name)) = (text("apiVersion"), text("kind")) else {
        return Err((None, vec![problem(doc.line, None, None, "not an object: needs apiVersion and kind".into())]));
    };
    let name = value.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).map(str::to_owned);
    let Some(kind) = Kind::from_type(&api_version, &kind_name).map_err(|m| {
        let field = if m.starts_with("apiVersion") { "apiVersion" } else { "kind" };
        let line = line_of(&doc.text, field).map_or(doc.line, |l| doc.line + l - 1);
        (None, vec![problem(line, None, Some(field), m)])
    })?
    else {
        return Ok(None);
    };
    let Some(name) = name else {
        return Err((None, vec![problem(doc.line, Some(kind_name), Some("metadata.name"), "is required".into())]));
    };
    let namespace = if kind.namespaced() {
        value.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    let key = ObjectKey { kind, namespace, name };
    let object = Some(key.to_string());

    // 2. The schema: types and unknown fields, with the exact line.
    let resource = typed(kind, value, &doc.text).map_err(|(path, message, line)| {
        let line = doc.line + line.unwrap_or(1) - 1;
        let path = (!path.is_empty() && path != ".").then_some(path);
        (Some(key.clone()), vec![problem(line, object.clone(), path.as_deref(), message)])
    })?;

    // 3. Meaning: names, addresses, selectors, principals, L4-vs-L7.
    let issues = validate::validate(&resource);
    if issues.is_empty() {
        return Ok(Some((key, resource)));
    }
    let problems = issues
        .into_iter()
        .map(|(field, message)| {
            let line = line_of(&doc.text, &field).map_or(doc.line, |l| doc.line + l - 1);
            problem(line, object.clone(), Some(&field), message)
        })
        .collect();
    Err((Some(key), problems))
}

/// The typed object from the already parsed document; `text` locates errors.
fn typed(kind: Kind, mut value: Value, text: &str) -> Result<Resource, (String, String, Option<usize>)> {
    // deny_unknown_fields would reject these two; they were checked already.
    if let Some(map) = value.as_mapping_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    unmodelled::remove(kind, &mut value);
    Ok(match kind {
        Kind::Namespace => Resource::Namespace(de(value, text)?),
        Kind::Node => Resource::Node(de(value, text)?),
        Kind::ServiceAccount => Resource::ServiceAccount(de(value, text)?),
        Kind::Pod => Resource::Pod(de(value, text)?),
        Kind::Service => Resource::Service(de(value, text)?),
        Kind::EndpointSlice => Resource::EndpointSlice(de(value, text)?),
        Kind::PeerAuthentication => Resource::PeerAuthentication(de(value, text)?),
        Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(de(value, text)?),
        Kind::RequestAuthentication => Resource::RequestAuthentication(de(value, text)?),
        Kind::Telemetry => Resource::Telemetry(de(value, text)?),
        Kind::ServiceEntry => Resource::ServiceEntry(de(value, text)?),
        Kind::WorkloadEntry => Resource::WorkloadEntry(de(value, text)?),
        Kind::Gateway => Resource::Gateway(de(value, text)?),
        Kind::HttpRoute => Resource::HttpRoute(de(value, text)?),
        Kind::GrpcRoute => Resource::GrpcRoute(de(value, text)?),
        Kind::VirtualService => Resource::VirtualService(de(value, text)?),
        Kind::DestinationRule => Resource::DestinationRule(de(value, text)?),
        Kind::HttpLocalRateLimitPolicy => Resource::HttpLocalRateLimitPolicy(de(value, text)?),
        Kind::ConfigMap => Resource::ConfigMap(de(value, text)?),
        k if k.is_opaque() => Resource::Opaque(Opaque { kind: k, ..de(value, text)? }),
        k => unreachable!("{k:?} has a typed arm above"),
    })
}

fn de<T: DeserializeOwned>(value: Value, text: &str) -> Result<T, (String, String, Option<usize>)> {
    let result: Result<T, _> = serde_path_to_error::deserialize(value);
    result.map_err(|e| {
        let path = e.path().to_string();
        let message = strip_location(&e.inner().to_string());
        let line = line_of(text, &path);
        (path, message, line)
    })
}

/// serde_yaml's messages carry " at line N column M" (relative to the
/// document); we print our own location, relative to the file.
pub(crate) fn strip_location(message: &str) -> String {
    let Some(start) = message.find(" at line ") else { return message.to_string() };
    let rest = &message[start + 9..];
    let end = rest.find(',').map_or(message.len(), |i| start + 9 + i);
    format!("{}{}", &message[..start], &message[end..])
}
