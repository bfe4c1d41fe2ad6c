//! The real text evaluations run on: natural English written by people, shipped
//! in the repository's `tests/data/` (its `README.md` says where each file came
//! from and under which licence).

use std::path::{Path, PathBuf};

use tandem_runtime::{Error, Result};

/// Where the text files live, relative to the repository.
pub const DATA_RELATIVE: &str = "tests/data";

/// The text files, in the order [`load`] concatenates them: the Debian FAQ (prose)
/// first, then licence texts.
pub const FILES: &[&str] = &[
    "debian-faq.txt",
    "fill.txt",
    "gpl-2.0.txt",
    "lgpl-2.1.txt",
    "mpl-2.0.txt",
];

/// The text directory: `$TANDEM_DATA` if set, else `tests/data` under the current
/// directory, the executable's repository (`target/release/tandem` -> root), or
/// the source tree this crate was built from, whichever exists first.
pub fn data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_DATA") {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from(DATA_RELATIVE)];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(DATA_RELATIVE));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DATA_RELATIVE),
    );
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .unwrap_or_else(|| candidates.swap_remove(0))
}

/// Reads one text file, with an error naming it if it is missing or unreadable.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause: if cause.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                cause.kind(),
                format!("missing (the evaluation text ships in the repository's {DATA_RELATIVE}/; set TANDEM_DATA to its directory)"),
            )
        } else {
            cause
        },
    })
}

/// All of [`FILES`] in `dir`, concatenated with a blank line between files.
pub fn load_from(dir: &Path) -> Result<String> {
    let mut text = String::new();
    for name in FILES {
        let part = read(&dir.join(name))?;
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(part.trim());
    }
    Ok(text)
}

/// All of [`FILES`] in [`data_dir`], concatenated.
pub fn load() -> Result<String> {
    load_from(&data_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_file_in_order() {
        let text = load().unwrap();
        assert!(text.starts_with("The Debian GNU/Linux FAQ"));
        assert!(text
            .contains("GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991"));
        assert!(text.contains("Apache License"));
        assert!(text
            .trim_end()
            .ends_with("defined by the Mozilla Public License, v. 2.0."));
        assert!(text.len() > 250_000, "{} bytes", text.len());
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = std::env::temp_dir().join(format!("tandem-no-corpus-{}", std::process::id()));
        let err = load_from(&dir).unwrap_err().to_string();
        assert!(
            err.contains("debian-faq.txt") && err.contains("missing"),
            "{err}"
        );
    }
}
