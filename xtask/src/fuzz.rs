//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the libFuzzer targets in
//! `fuzz/` (cargo fuzz), each for N seconds, from its seed corpus and the
//! corpus earlier runs grew (kept under `/var/tmp/mesh-fuzz`, outside the
//! clone). Before fuzzing, every input in `fuzz/regressions/<target>/` (a
//! crash once found) runs once. A crash fails the command and leaves the
//! input in `/var/tmp/mesh-fuzz/<target>/crashes/`: copy it into
//! `fuzz/regressions/<target>/` with the fix.
//!
//! Seeds: the binary formats (node updates, HBONE bytes, CSRs, tokens,
//! authorizer answers) are written by each target from the project's own
//! types (`MESH_FUZZ_WRITE_SEEDS`); the YAML target's are every YAML file of
//! the repository and every YAML text in its Rust sources (test fixtures).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{prereqs, step};

pub const TARGETS: &[&str] =
    &["config_yaml", "node_update", "hbone_server", "ca_csr", "admin_body", "jwt", "ext_authz_response"];
const WORK: &str = "/var/tmp/mesh-fuzz";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!("no fuzz target named {unknown:?} (there are {})", TARGETS.join(", "));
    }
    let targets: Vec<&str> =
        TARGETS.iter().copied().filter(|t| only.is_empty() || only.iter().any(|o| o == t)).collect();
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let target_dir = std::env::var("MESH_FUZZ_TARGET_DIR").unwrap_or_else(|_| "/var/tmp/mesh-fuzz-target".into());
    step("building the fuzz targets (cargo fuzz, coverage-instrumented, release)");
    // No sanitizer: the code under test is safe Rust, and this way the
    // build needs no nightly toolchain; panics and overflows are the crashes.
    let status = Command::new(&cargo_fuzz)
        .args(["fuzz", "build", "--sanitizer", "none", "--fuzz-dir", "fuzz"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PATH", prereqs::path_with_tools())
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed");
    }
    let bins = Path::new(&target_dir).join("x86_64-unknown-linux-gnu/release");
    let mut failed = Vec::new();
    for target in &targets {
        let bin = bins.join(target);
        let work = Path::new(WORK).join(target);
        let (seeds, corpus, crashes) = (work.join("seeds"), work.join("corpus"), work.join("crashes"));
        let _ = fs::remove_dir_all(&seeds);
        for dir in [&seeds, &corpus, &crashes] {
            fs::create_dir_all(dir)?;
        }
        if *target == "config_yaml" {
            write_yaml_seeds(&seeds)?;
        } else {
            let out = Command::new(&bin).env("MESH_FUZZ_WRITE_SEEDS", &seeds).output()?;
            if !out.status.success() {
                bail!("{target}: writing its seeds failed:\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let regressions: Vec<PathBuf> = fs::read_dir(Path::new("fuzz/regressions").join(target))
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default();
        if !regressions.is_empty() {
            let out = Command::new(&bin).args(&regressions).output()?;
            if !out.status.success() {
                eprintln!("{}", String::from_utf8_lossy(&out.stderr));
                failed.push(format!("{target}: a regression input crashes again"));
                continue;
            }
        }
        step(&format!(
            "fuzzing {target} for {seconds} s ({} seeds, {} regression inputs)",
            count(&seeds),
            regressions.len()
        ));
        let out = Command::new(&bin)
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"])
            .arg(format!("-artifact_prefix={}/", crashes.display()))
            .arg(&corpus)
            .arg(&seeds)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let summary = log.lines().filter(|l| l.contains("DONE") || l.starts_with("stat::number_of_executed_units"));
        for line in summary {
            println!("  {target}: {line}");
        }
        if !out.status.success() {
            eprintln!("{log}");
            failed.push(format!("{target}: crashed (input in {})", crashes.display()));
        }
    }
    if !failed.is_empty() {
        bail!("fuzzing found crashes:\n  {}", failed.join("\n  "));
    }
    println!("fuzz: {} targets, {seconds} s each, no crash", targets.len());
    Ok(())
}

fn count(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// cargo-fuzz, installed from crates.io under /var/tmp/mesh-tools when missing.
fn ensure_cargo_fuzz() -> anyhow::Result<PathBuf> {
    let root = Path::new(prereqs::TOOLS_ROOT).join("cargo-fuzz");
    let bin = root.join("bin/cargo-fuzz");
    if bin.exists() {
        return Ok(bin);
    }
    step(&format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}", root.display()));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--root"])
        .arg(&root)
        .status()?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(bin)
}

/// Every `*.yaml` of the repository and every YAML text in its Rust sources.
fn write_yaml_seeds(dir: &Path) -> anyhow::Result<()> {
    let mut n = 0;
    let mut add = |text: &str| -> anyhow::Result<()> {
        n += 1;
        Ok(fs::write(dir.join(format!("seed-{n:04}.yaml")), text)?)
    };
    for file in source_files(Path::new("."))? {
        let text = fs::read_to_string(&file).unwrap_or_default();
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => add(&text)?,
            Some("rs") => {
                for literal in string_literals(&text).into_iter().filter(|s| s.contains("kind:")) {
                    add(&literal)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn source_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            out.extend(source_files(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

/// The string literals of Rust source `text`, unescaped (`"..."` with its
/// escapes and line continuations, and raw `r#"..."#`). Approximate (it does
/// not skip comments): good enough to find fixtures.
fn string_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    let mut prev = ' ';
    while let Some((i, c)) = chars.next() {
        if c == '"' && prev == '#' && text[..i].ends_with("r#") {
            let rest = &text[i + 1..];
            if let Some(end) = rest.find("\"#") {
                out.push(rest[..end].to_owned());
                for _ in 0..end + 2 {
                    chars.next();
                }
            }
            prev = '#';
            continue;
        }
        if c == '"' && prev != '\'' {
            let mut s = String::new();
            while let Some((_, c)) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next().map(|(_, e)| e) {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('\n') => {
                            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                                chars.next();
                            }
                        }
                        Some(e) => s.push(e),
                        None => {}
                    },
                    c => s.push(c),
                }
            }
            out.push(s);
            prev = '"';
            continue;
        }
        prev = c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::string_literals;

    #[test]
    fn finds_plain_and_raw_literals_unescaped() {
        let src = "let a = \"kind: Pod\\nmetadata: {name: \\\"x\\\"}\\n\\\n    spec: {}\";\nlet c = '\"';\nlet b = r#\"kind: \"Service\"\"#;";
        let found = string_literals(src);
        assert_eq!(found[0], "kind: Pod\nmetadata: {name: \"x\"}\nspec: {}");
        assert!(found.contains(&"kind: \"Service\"".to_string()), "{found:?}");
    }
}
