//! Where edgechat keeps things: the platform data dir (macOS `~/Library/Application Support/edgechat`,
//! Linux `$XDG_DATA_HOME/edgechat`), or `$EDGECHAT_HOME` when set.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    pub data: PathBuf,
    pub cache: PathBuf,
}

impl Paths {
    pub fn resolve() -> Result<Self> {
        if let Some(home) = std::env::var_os("EDGECHAT_HOME").filter(|h| !h.is_empty()) {
            let data = PathBuf::from(home);
            return Ok(Paths { cache: data.join("cache"), data });
        }
        let dirs = directories::ProjectDirs::from("", "", "edgechat")
            .context("cannot find a home directory for edgechat's data: set EDGECHAT_HOME")?;
        Ok(Paths { data: dirs.data_dir().to_owned(), cache: dirs.cache_dir().to_owned() })
    }

    /// Adapters the user installed; they take precedence over built-in ones of the same name.
    pub fn user_adapters(&self) -> PathBuf {
        self.data.join("adapters")
    }

    pub fn models(&self) -> PathBuf {
        self.data.join("Models")
    }

    pub fn database(&self) -> PathBuf {
        self.data.join("edgechat.db")
    }

    pub fn compiled_adapters(&self) -> PathBuf {
        self.cache.join("compiled-adapters")
    }

    /// Adapters shipped with this build: next to the executable in a packaged install, else the
    /// workspace's `target/adapters` written by `cargo xtask adapters`.
    pub fn builtin_adapters() -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(exe_dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
            dirs.push(exe_dir.join("adapters"));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
        dirs.push(workspace.join("target/adapters"));
        dirs
    }
}

/// Free bytes on the filesystem holding `path` (or its nearest existing ancestor).
pub fn free_space(path: &Path) -> Option<u64> {
    let mut probe = path;
    while !probe.exists() {
        probe = probe.parent()?;
    }
    let c_path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated path and stat points to writable memory of the right size.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Largest config.json accepted (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Largest other JSON file read whole (tokenizer_config.json with its chat template, manifest.json).
pub const MAX_JSON_BYTES: u64 = 32 << 20;

/// Reads a text file whole, refusing one larger than `max` bytes before reading it (model directories
/// come from the internet).
pub fn read_capped(path: &Path, max: u64) -> anyhow::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let refused = || anyhow::anyhow!("{} is larger than {} MiB; refused", path.display(), max >> 20);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        return Err(refused());
    }
    // Room for exactly the file (a tokenizer_config.json read into doubling room held 2 MB for 1.1).
    let mut text = String::with_capacity(len as usize);
    file.take(max + 1).read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > max {
        return Err(refused());
    }
    Ok(text)
}
