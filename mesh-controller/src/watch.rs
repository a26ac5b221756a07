//! Watching the configuration directory: a fingerprint of every YAML file's
//! path, size and modification time, compared every `interval`. Cheap for the
//! directories people write by hand, and it needs no inotify (which misses
//! edits made through some bind mounts and editors' rename dances).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Fingerprint) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            walk(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push((path, meta.len(), meta.modified().ok()));
        }
    }
}

/// Waits until the directory's fingerprint differs from `last`; returns the new one.
pub async fn changed(dir: &Path, last: &Fingerprint, interval: Duration) -> Fingerprint {
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(dir);
        if &now != last {
            return now;
        }
    }
}
