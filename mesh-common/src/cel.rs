//! Istio's Telemetry expressions: access-log filters and metric tag values
//! are CEL over Envoy's attributes (`response.code`, `request.headers`,
//! `connection.mtls`, `source.address`, ...). cel-rust parses them (the
//! configuration's validation and the proxies share [`compile`]) and
//! evaluates them over the attributes a proxy knows of a request or a
//! connection ([`Attributes`]).
use std::{collections::HashMap, sync::Arc};

pub use cel::Program;
use cel::{Context, Value};

/// Parses a CEL expression.
pub fn compile(expr: &str) -> Result<Program, String> {
    Program::compile(expr).map_err(|e| one_line(&e.to_string()))
}

/// cel-rust's parse errors on one line, for admission warnings, `mesh-ctl
/// check` and logs: each `ERROR: <input>:L:C: message` as `at L:C:
/// message`, without the caret diagram under the expression.
fn one_line(text: &str) -> String {
    let errors: Vec<String> =
        text.lines().filter_map(|l| l.strip_prefix("ERROR: <input>:")).map(|l| format!("at {}", l.trim())).collect();
    if errors.is_empty() { text.split_whitespace().collect::<Vec<_>>().join(" ") } else { errors.join("; ") }
}

/// A compiled expression with its text (shown in logs and debug views).
#[derive(Clone)]
pub struct Expression {
    pub text: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl Expression {
    pub fn new(text: &str) -> Result<Expression, String> {
        Ok(Expression { text: text.to_owned(), program: Arc::new(compile(text)?) })
    }
}

/// Envoy's attributes of one request or connection, by their two-part names
/// (`request.method`, `response.code`); absent ones are absent (an
/// expression that reads one is an error, as in Envoy).
#[derive(Default)]
pub struct Attributes {
    groups: HashMap<&'static str, HashMap<String, Value>>,
}

impl Attributes {
    /// Sets `group.name` (e.g. `("response", "code")`).
    pub fn set(&mut self, group: &'static str, name: &str, value: impl Into<Value>) -> &mut Self {
        self.groups.entry(group).or_default().insert(name.to_owned(), value.into());
        self
    }

    /// Sets `group.name` to a map of strings (`request.headers`).
    pub fn set_map<'a>(
        &mut self,
        group: &'static str,
        name: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> &mut Self {
        let map: HashMap<String, Value> =
            entries.into_iter().map(|(k, v)| (k.to_owned(), Value::String(Arc::new(v.to_owned())))).collect();
        self.set(group, name, map)
    }

    fn evaluate(&self, e: &Expression) -> Result<Value, String> {
        let mut cx = Context::default();
        for (group, values) in &self.groups {
            cx.add_variable_from_value(*group, values.clone());
        }
        e.program.execute(&cx).map_err(|err| err.to_string())
    }

    /// Whether a filter admits: only a `true` result does (an error or
    /// another value does not, as Envoy's CEL filter decides).
    pub fn admits(&self, filter: &Expression) -> bool {
        matches!(self.evaluate(filter), Ok(Value::Bool(true)))
    }

    /// A tag's value: the expression's result as text; `None` on an error.
    pub fn text(&self, e: &Expression) -> Option<String> {
        match self.evaluate(e).ok()? {
            Value::String(s) => Some(s.as_ref().clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::UInt(u) => Some(u.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_are_one_line_with_their_place() {
        for (expr, want) in [
            ("response.code >=", "at 1:17: Syntax error: mismatched input '<EOF>' expecting {"),
            ("1 +* 2", "at 1:4: Syntax error: extraneous input '*'"),
        ] {
            let Err(e) = compile(expr) else { panic!("{expr} was accepted") };
            assert!(e.starts_with(want) && !e.contains('\n') && !e.contains('^'), "{expr}: {e}");
        }
    }

    fn request(code: i64, mtls: bool) -> Attributes {
        let mut a = Attributes::default();
        a.set("response", "code", code)
            .set("request", "method", "GET")
            .set("request", "path", "/api/v1")
            .set_map("request", "headers", [("x-user", "ana")])
            .set("connection", "mtls", mtls);
        a
    }

    #[test]
    fn filters_as_envoy_evaluates_them() {
        let e = |t: &str| Expression::new(t).unwrap();
        let cases = [
            ("response.code >= 400", 404, true),
            ("response.code >= 400", 200, false),
            ("response.code >= 500 || request.headers['x-user'] == 'ana'", 200, true),
            ("request.method == 'GET' && request.path.startsWith('/api')", 200, true),
            ("!connection.mtls", 200, false),
            ("request.headers['x-missing'] == 'a'", 200, false), // an error: not admitted
            ("upstream.address == '1.2.3.4'", 500, false),       // an absent attribute: an error
            ("response.code", 500, false),                       // not a bool
        ];
        for (filter, code, want) in cases {
            assert_eq!(request(code, true).admits(&e(filter)), want, "{filter} at {code}");
        }
        assert_eq!(request(201, true).text(&e("string(response.code)")).as_deref(), Some("201"));
        assert_eq!(request(201, true).text(&e("request.headers['x-user']")).as_deref(), Some("ana"));
        assert_eq!(request(201, true).text(&e("request.nope")), None);
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in ["response.code >=", "request.headers[", "a b"] {
            assert!(compile(bad).is_err(), "{bad}");
        }
    }
}
