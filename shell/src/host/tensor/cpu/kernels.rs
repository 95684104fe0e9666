//! ggml's compute kernels, chosen for this processor at run time.
//!
//! ggml's CPU code is built once per processor generation (x86-64: from plain SSE2 through AVX2 to
//! AVX-512 with VNNI and AMX; llama-cpp-sys-2's `dynamic-backends`), each as a module that exports the
//! same functions and a score: 0 where the processor lacks an instruction the module uses, higher the
//! more of them it uses. The graph builder, allocator and types (ggml-base) are linked as usual; only the
//! functions that run kernels (and the AMX buffer type, see `packed.rs`) come from the module with the
//! best score. This is how ggml loads its
//! own backends, and what lets one binary run on any x86-64 (the AVX2 build shipped before stopped at
//! processors without AVX2).
//!
//! Modules are looked for beside the executable (an installed build) and where the build put them;
//! only files named like ggml's CPU modules are loaded.

use libloading::Library;
use llama_cpp_sys_2 as g;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The kernel functions of the chosen module. The library stays loaded for the life of the process.
pub struct Kernels {
    /// The processor generation the module was built for, as ggml names it ("haswell", "icelake", ...).
    pub variant: String,
    pub cpu_init: unsafe extern "C" fn(),
    pub threadpool_new: unsafe extern "C" fn(*mut g::ggml_threadpool_params) -> *mut g::ggml_threadpool,
    pub graph_plan: unsafe extern "C" fn(*const g::ggml_cgraph, i32, *mut g::ggml_threadpool) -> g::ggml_cplan,
    pub graph_compute: unsafe extern "C" fn(*mut g::ggml_cgraph, *mut g::ggml_cplan) -> g::ggml_status,
    pub buffer_type: unsafe extern "C" fn() -> g::ggml_backend_buffer_type_t,
    /// ggml's AMX buffer type, where the module and the processor have AMX (see `packed.rs`).
    pub amx: Option<BufferType>,
    _library: Library,
}

/// A ggml buffer type: a static, immutable table of functions inside the module.
#[derive(Clone, Copy)]
pub struct BufferType(pub g::ggml_backend_buffer_type_t);

// SAFETY: ggml's buffer types are statics the module never changes; their functions may be called from
// any thread.
unsafe impl Send for BufferType {}
unsafe impl Sync for BufferType {}

/// The best kernels for this processor, loaded on first use; or why there are none.
pub fn kernels() -> Result<&'static Kernels, String> {
    static KERNELS: OnceLock<Result<Kernels, String>> = OnceLock::new();
    KERNELS.get_or_init(|| best_of(&module_files(&search_dirs()))).as_ref().map_err(Clone::clone)
}

/// Beside the executable first (an installed build ships its modules there), then the build's own.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        dirs.push(exe_dir.to_path_buf());
    }
    if let Some(built) = option_env!("EDGECHAT_GGML_MODULES") {
        dirs.push(PathBuf::from(built));
    }
    dirs
}

/// The CPU modules in the first directory that has any, with their variant names.
fn module_files(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let prefix = format!("{}ggml-cpu-", std::env::consts::DLL_PREFIX);
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut found: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let variant = name.strip_prefix(&prefix)?.strip_suffix(std::env::consts::DLL_SUFFIX)?;
                let plain = !variant.is_empty() && variant.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                plain.then(|| (variant.to_owned(), e.path()))
            })
            .collect();
        if !found.is_empty() {
            found.sort();
            return found;
        }
    }
    Vec::new()
}

/// Loads each module that may run here ([`eligible`]), asks its score, and keeps the best (ggml's own
/// rule).
fn best_of(modules: &[(String, PathBuf)]) -> Result<Kernels, String> {
    if modules.is_empty() {
        return Err("the cpu backend's kernels (ggml's CPU modules) are not installed beside edgechat".into());
    }
    let mut best: Option<(i32, &str, Library)> = None;
    for (variant, path) in modules.iter().filter(|(variant, _)| eligible(variant)) {
        // SAFETY: a ggml CPU module built with this binary; loading runs no code of ours, and its score
        // function only reads the processor's feature flags.
        let score = unsafe {
            let Ok(library) = Library::new(path) else { continue };
            let Ok(score) = library.get::<unsafe extern "C" fn() -> i32>(b"ggml_backend_score\0") else { continue };
            let score = score();
            if score > best.as_ref().map_or(0, |b| b.0) {
                best = Some((score, variant, library));
            }
            score
        };
        tracing::debug!(target: "ggml", "{variant}: score {score}");
    }
    let (_, variant, library) = best.ok_or("none of ggml's CPU modules runs on this processor")?;
    // SAFETY: the signatures are ggml-cpu.h's and ggml-backend.h's for these names, from the same ggml
    // sources the bindings were generated from.
    unsafe {
        let get = |name: &str| format!("ggml's {variant} module lacks {name}");
        let kernels = Kernels {
            variant: variant.to_owned(),
            cpu_init: *library.get(b"ggml_cpu_init\0").map_err(|_| get("ggml_cpu_init"))?,
            threadpool_new: *library.get(b"ggml_threadpool_new\0").map_err(|_| get("ggml_threadpool_new"))?,
            graph_plan: *library.get(b"ggml_graph_plan\0").map_err(|_| get("ggml_graph_plan"))?,
            graph_compute: *library.get(b"ggml_graph_compute\0").map_err(|_| get("ggml_graph_compute"))?,
            buffer_type: *library.get(b"ggml_backend_cpu_buffer_type\0").map_err(|_| get("ggml_backend_cpu_buffer_type"))?,
            amx: None,
            _library: library,
        };
        (kernels.cpu_init)();
        let amx = extra_buffer_type(&kernels._library, c"AMX");
        Ok(Kernels { amx, ..kernels })
    }
}

/// One of the module's extra buffer types by name, as llama.cpp finds them: through the module's backend
/// registry ("ggml_backend_dev_get_extra_bufts"). ggml lists AMX only where the processor has it and the
/// kernel let this process use its tile registers.
///
/// SAFETY: `library` is a ggml CPU module whose `ggml_cpu_init` has run.
unsafe fn extra_buffer_type(library: &Library, name: &std::ffi::CStr) -> Option<BufferType> {
    type ExtraBufferTypes = unsafe extern "C" fn(g::ggml_backend_dev_t) -> *mut g::ggml_backend_buffer_type_t;
    unsafe {
        let init = library.get::<unsafe extern "C" fn() -> g::ggml_backend_reg_t>(b"ggml_backend_init\0").ok()?;
        let registry = init();
        if registry.is_null() || g::ggml_backend_reg_dev_count(registry) == 0 {
            return None;
        }
        let device = g::ggml_backend_reg_dev_get(registry, 0);
        let get = g::ggml_backend_reg_get_proc_address(registry, c"ggml_backend_dev_get_extra_bufts".as_ptr());
        let get: ExtraBufferTypes = std::mem::transmute::<*mut std::ffi::c_void, Option<ExtraBufferTypes>>(get)?;
        let mut types = get(device);
        while !types.is_null() && !(*types).is_null() {
            if std::ffi::CStr::from_ptr(g::ggml_backend_buft_name(*types)) == name {
                return Some(BufferType(*types));
            }
            types = types.add(1);
        }
        None
    }
}

/// Whether a module may run here, beyond ggml's score: ggml's score reads the processor's feature bits,
/// not whether the operating system saves the wider registers those features use. A virtual machine can
/// report AVX or AVX-512 with that state off, and the first such instruction would stop the process.
/// Rust's feature detection reads both.
fn eligible(variant: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        return match variant {
            "x64" | "sse42" => true,
            v if AVX512_VARIANTS.contains(&v) => std::arch::is_x86_feature_detected!("avx512f"),
            _ => std::arch::is_x86_feature_detected!("avx"),
        };
    }
    #[allow(unreachable_code)]
    true
}

/// ggml's x86-64 modules built for AVX-512.
const AVX512_VARIANTS: [&str; 7] = ["skylakex", "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "sapphirerapids"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_module_this_processor_runs_is_chosen() {
        let modules = module_files(&search_dirs());
        assert!(modules.len() > 1, "one module per processor generation: {modules:?}");
        let kernels = kernels().expect("this machine runs the cpu backend");
        // The chosen module is the one ggml's own loader would take: the highest score.
        let scores: Vec<(i32, &str)> = modules
            .iter()
            .map(|(variant, path)| {
                // SAFETY: as in best_of.
                let score = unsafe {
                    let library = Library::new(path).unwrap();
                    library.get::<unsafe extern "C" fn() -> i32>(b"ggml_backend_score\0").map(|f| f()).unwrap_or(0)
                };
                (score, variant.as_str())
            })
            .collect();
        let top = scores.iter().filter(|s| eligible(s.1)).map(|s| s.0).max().unwrap();
        assert!(top > 0);
        assert!(scores.iter().any(|&(s, v)| s == top && v == kernels.variant), "{scores:?} chose {}", kernels.variant);
        assert!(eligible(&kernels.variant), "{}", kernels.variant);
        #[cfg(target_arch = "x86_64")]
        {
            // 512-bit kernels are taken exactly where the processor and the OS both run them.
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            assert!(AVX512_VARIANTS.iter().all(|v| eligible(v) == avx512));
            let takes_512 = scores.iter().any(|&(s, v)| s > 0 && AVX512_VARIANTS.contains(&v));
            assert_eq!(AVX512_VARIANTS.contains(&kernels.variant.as_str()), avx512 && takes_512, "{scores:?}");
            // The baseline module runs on any x86-64; one built for AVX2 scores only where AVX2 is.
            assert!(scores.iter().any(|&(s, v)| v == "x64" && s > 0), "{scores:?}");
            let haswell = scores.iter().find(|&&(_, v)| v == "haswell").map(|s| s.0);
            assert_eq!(haswell.map(|s| s > 0), Some(std::arch::is_x86_feature_detected!("avx2")), "{scores:?}");
        }
    }

    #[test]
    fn only_files_named_like_ggml_cpu_modules_are_candidates() {
        let dir = std::env::temp_dir().join(format!("edgechat-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pre, suf) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
        for name in [format!("{pre}ggml-cpu-haswell{suf}"), format!("{pre}ggml-base{suf}"), format!("{pre}ggml-cpu-{suf}"),
            format!("{pre}ggml-cpu-../x{suf}"), format!("{pre}ggml-cpu-zen4{suf}.bak"), "notes.txt".into()]
        {
            let _ = std::fs::write(dir.join(name), b"");
        }
        let found = module_files(&[dir.join("missing"), dir.clone()]);
        assert_eq!(found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["haswell"]);
        // An empty file is no module: nothing is chosen, and the reason says so.
        let why = best_of(&found).err().expect("no kernels");
        assert!(why.contains("none of ggml's CPU modules"), "{why}");
        assert!(best_of(&[]).err().unwrap().contains("not installed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
