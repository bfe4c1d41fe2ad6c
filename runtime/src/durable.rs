//! Crash-safe file replacement: a reader sees the old file or the new one,
//! never a part of either, even if the process is killed or the machine loses
//! power while writing.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Replaces `path` with what `write` writes: fills a temporary file in the
/// same directory, flushes it to disk, renames it over `path` and flushes
/// the directory. If `write` fails, the temporary file is removed and `path`
/// is left as it was.
pub(crate) fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let temp = temp_path(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    sync_directory(path)
}

/// `DIR/.NAME.tmp`: in the same directory, so the rename stays on one file system.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(".tmp");
    Ok(path.with_file_name(temp))
}

/// Makes the rename itself durable (the directory entry is data too).
fn sync_directory(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
        write_atomically_with(path, |file| file.write_all(bytes))
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tandem-durable-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir.join("file.bin")
    }

    #[test]
    fn replaces_the_file() {
        let path = scratch("replace");
        write_atomically(&path, b"first").expect("write");
        write_atomically(&path, b"second").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert!(!temp_path(&path).expect("temp").exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let path = scratch("fail");
        write_atomically(&path, b"old contents").expect("write");
        let err = write_atomically_with(&path, |file| {
            file.write_all(b"half of the new")?;
            Err(io::Error::other("disk gone"))
        })
        .expect_err("the write fails");
        assert_eq!(err.to_string(), "disk gone");
        assert_eq!(std::fs::read(&path).expect("read"), b"old contents");
        assert!(!temp_path(&path).expect("temp").exists());
    }
}
