//! State files a process keeps across restarts, written so that a crash or
//! a power cut leaves either the old file or the new one, never a torn one.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Writes `bytes` to `path` atomically with permissions `mode`: a temporary
/// file beside it, flushed to disk, renamed over the old one, and the
/// directory flushed so the rename itself survives.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp_name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?.to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn replaces_the_file_whole_with_the_mode_asked_for() {
        let dir = std::env::temp_dir().join(format!("mesh-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        fs::write(&path, "old").unwrap();
        // A temporary file a crash left behind does not stop the next write.
        fs::write(dir.join("state.json.tmp"), "torn").unwrap();
        write_atomically(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.join("state.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
