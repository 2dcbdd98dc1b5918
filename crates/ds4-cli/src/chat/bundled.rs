//! The tiny test model compiled into the binary (crates/ds4-cli/assets, made by
//! scripts/make_bundled_model.sh): the vocab_real fixture with DeepSeek V4's real tokenizer
//! and random weights. It is written once to a cache file so the normal mmap loader opens it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha1::{Digest, Sha1};

/// What to tell the user when the bundled model is used.
pub const NOTICE: &str = "ds4: notice: no -m given and ./ds4flash.gguf not found: using the \
                          bundled tiny test model (real tokenizer, random weights). Its output \
                          is meaningless.";

static TINY_MODEL: &[u8] = include_bytes!("../../assets/tiny-test-model.gguf");

/// The cache directory: $XDG_CACHE_HOME/ds4, else $HOME/.cache/ds4, else the temp directory.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ds4");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("ds4");
    }
    std::env::temp_dir().join("ds4-cache")
}

/// The path of the bundled model on disk, writing it first if the cache lacks an intact copy.
/// The file name carries a hash of the contents, so binaries with different bundled models
/// never share a file; it is written to a temporary name and renamed, so a concurrent reader
/// never sees a partial file.
pub fn materialize() -> anyhow::Result<PathBuf> {
    materialize_in(&cache_dir())
}

/// [`materialize`] into `dir`.
fn materialize_in(dir: &Path) -> anyhow::Result<PathBuf> {
    let digest = Sha1::digest(TINY_MODEL);
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("tiny-test-model-{tag}.gguf"));
    if let Ok(existing) = std::fs::read(&path) {
        if existing == TINY_MODEL {
            return Ok(path);
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the cache directory {}", dir.display()))?;
    let tmp = dir.join(format!(
        "tiny-test-model-{tag}.gguf.tmp{}",
        std::process::id()
    ));
    std::fs::write(&tmp, TINY_MODEL)
        .with_context(|| format!("writing the bundled test model to {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!(
            "moving the bundled test model to {}",
            path.display()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_copy_is_written_once_and_repaired() {
        let dir = std::env::temp_dir().join(format!("ds4-bundled-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = materialize_in(&dir).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), TINY_MODEL);
        assert_eq!(materialize_in(&dir).unwrap(), path);
        // A damaged copy (a truncated write, a changed byte) is replaced.
        std::fs::write(&path, &TINY_MODEL[..1000]).unwrap();
        assert_eq!(materialize_in(&dir).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), TINY_MODEL);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unusable_cache_directory_is_named() {
        // A path below a regular file can never be a directory.
        let file = std::env::temp_dir().join(format!("ds4-bundled-file-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let err = materialize_in(&file.join("cache")).unwrap_err();
        assert!(
            format!("{err:#}").contains(&file.display().to_string()),
            "{err:#}"
        );
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn bundled_model_is_a_gguf_under_12_mib() {
        assert_eq!(&super::TINY_MODEL[..4], b"GGUF");
        assert!(super::TINY_MODEL.len() < 12 << 20);
    }
}
