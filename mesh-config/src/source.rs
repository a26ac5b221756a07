//! Reading the configuration directory: files of `---`-separated documents,
//! each remembered with the line it starts on.
use std::{
    fs,
    path::{Path, PathBuf},
};

use super::Problem;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Document {
    pub file: PathBuf,
    /// 1-based line of the document's first line in the file.
    pub line: usize,
    pub text: String,
}

/// Every `*.yaml` / `*.yml` file under `dir` (recursively, in path order),
/// split into documents. Unreadable files become problems.
pub fn read_dir(dir: &Path) -> (Vec<Document>, Vec<Problem>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    collect(dir, &mut files, &mut problems);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => docs.extend(split_documents(&file, &text)),
            Err(e) => problems.push(Problem {
                file: file.clone(),
                line: 1,
                object: None,
                field: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    (docs, problems)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(Problem {
                file: dir.into(),
                line: 1,
                object: None,
                field: None,
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // editors' swap files, hidden directories
        }
        if path.is_dir() {
            collect(&path, files, problems);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(path);
        }
    }
}

/// Splits a file on `---` separator lines. Documents that hold nothing but
/// comments and blank lines are dropped.
pub fn split_documents(file: &Path, text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut current = String::new();
    let mut flush = |start: usize, current: &mut String| {
        let meaningful = current.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if meaningful {
            docs.push(Document { file: file.into(), line: start, text: std::mem::take(current) });
        }
        current.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let is_separator = line.starts_with("---") && line[3..].trim().chars().next().is_none_or(|c| c == '#');
        if is_separator {
            flush(start, &mut current);
            start = i + 2;
        } else {
            if current.is_empty() {
                if line.trim().is_empty() {
                    continue; // the document starts at its first non-blank line
                }
                start = i + 1;
            }
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(start, &mut current);
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_line_numbers() {
        let text = "# header\n---\napiVersion: v1\nkind: Namespace\n---\n\n# only a comment\n---   # sep\nkind: Pod\n";
        let docs = split_documents(Path::new("f.yaml"), text);
        let got: Vec<(usize, &str)> = docs.iter().map(|d| (d.line, d.text.as_str())).collect();
        assert_eq!(got, vec![(3, "apiVersion: v1\nkind: Namespace\n"), (9, "kind: Pod\n")]);
    }

    #[test]
    fn a_file_without_separators_is_one_document() {
        let docs = split_documents(Path::new("f.yaml"), "\n\nkind: Pod\nmetadata: {}\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].line, 3);
    }
}
