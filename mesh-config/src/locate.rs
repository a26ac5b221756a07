//! Finds the line of a field path (`spec.rules[0].from[1].source`) in a YAML
//! document's text, so semantic errors point at the offending line. Handles
//! block style; inside flow style (`{a: 1}`) it gives the deepest key it found.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut cursor = 0usize; // index of the line the last segment matched
    let mut parent_indent: isize = -1;
    let mut found_any = false;
    let mut after_index = false; // `- key:` puts a list item's first key on the dash's line
    for segment in segments(path) {
        match segment {
            Segment::Key(key) => {
                let start = if !found_any {
                    0
                } else if after_index {
                    cursor
                } else {
                    cursor + 1
                };
                after_index = false;
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().skip(start) {
                    let (indent, body) = split_indent(line);
                    if body.is_empty() || body.starts_with('#') {
                        continue;
                    }
                    if found_any && (indent as isize) <= parent_indent && !body.starts_with("- ") {
                        break; // left the parent block
                    }
                    let body = body.strip_prefix("- ").unwrap_or(body);
                    if body.starts_with(&format!("{key}:")) {
                        hit = Some((i, indent + (line.trim_start().len() - body.len())));
                        break;
                    }
                }
                // Not found (flow style, or absent): the deepest key found so far.
                let Some((i, indent)) = hit else { return found_any.then_some(cursor + 1) };
                cursor = i;
                parent_indent = indent as isize;
                found_any = true;
            }
            Segment::Index(n) => {
                let mut seen = 0;
                let mut item_indent = None;
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().skip(cursor + 1) {
                    let (indent, body) = split_indent(line);
                    if body.is_empty() || body.starts_with('#') {
                        continue;
                    }
                    if (indent as isize) < parent_indent
                        || ((indent as isize) == parent_indent && !body.starts_with("- "))
                    {
                        break;
                    }
                    if body.starts_with("- ") || body == "-" {
                        let want = *item_indent.get_or_insert(indent);
                        if indent == want {
                            if seen == n {
                                hit = Some((i, indent));
                                break;
                            }
                            seen += 1;
                        }
                    }
                }
                let Some((i, indent)) = hit else { return Some(cursor + 1) };
                cursor = i;
                parent_indent = indent as isize;
                after_index = true;
            }
        }
    }
    found_any.then_some(cursor + 1)
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for idx in rest.split('[') {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(Segment::Index(n));
            }
        }
    }
    out
}

fn split_indent(line: &str) -> (usize, &str) {
    let body = line.trim_start();
    (line.len() - body.len(), body.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
spec:
  rules:
  - from:
    - source:
        principals: [\"a\"]
    - source:
        principals:
        - good
        - bad one
    to:
    - operation:
        ports: [\"80\"]
  - when:
    - key: request.headers[x]
";

    #[test]
    fn finds_fields_in_block_and_flow_style() {
        let cases = [
            ("metadata.name", Some(4)),
            ("spec.rules[0].from[1].source.principals[1]", Some(13)),
            ("spec.rules[0].from[0].source.principals[0]", Some(9)),
            ("spec.rules[0].to[0].operation.ports", Some(16)),
            ("spec.rules[1].when[0].key", Some(18)),
            ("spec.nothing", Some(5)),
            ("nothing.at.all", None),
        ];
        for (path, want) in cases {
            assert_eq!(line_of(DOC, path), want, "{path}");
        }
    }
}
