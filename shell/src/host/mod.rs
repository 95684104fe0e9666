//! Host capabilities imported by adapters, one module per WIT interface, all on [`HostState`]: the data
//! of one adapter's wasmtime store.

pub mod log;
pub mod net;
mod older;
pub mod tensor;
pub mod v0_1_0;
pub mod v0_2_0;
pub mod weights;

use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// Sandbox limits for one adapter instance.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory of the adapter.
    pub memory_bytes: usize,
    /// Wasm instructions (fuel) per call into the adapter; host time is not counted.
    pub fuel_per_call: u64,
    pub max_tensor_handles: usize,
    /// Bytes of all live tensors the adapter holds handles to, and of the largest intermediate an op
    /// may need (attention scores): a fraction of the machine's memory.
    pub max_tensor_bytes: u64,
    /// Wall-clock time per adapter call, host calls included (see [`Deadlines`]).
    pub deadlines: Deadlines,
}

/// Wall-clock limits per kind of adapter call, enforced with wasmtime epoch interruption (guest code)
/// and checked on entry to every host call (so a loop over `eval` or `net.get` ends too). Fuel bounds
/// guest instructions; these bound everything else. `EDGECHAT_DEADLINE_SCALE` multiplies them all, for
/// slow machines (or, below 1, for tests).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// `info`, `prompt.format`, cache and vocabulary queries: pure computation on small inputs.
    pub quick: Duration,
    /// `catalog.describe` and `catalog.manifest`: may wait on the network.
    pub catalog: Duration,
    /// `model.load`, `forward`, `self-test`: may build and evaluate large graphs.
    pub compute: Duration,
}

impl Deadlines {
    pub fn from_env() -> Deadlines {
        let scale = std::env::var("EDGECHAT_DEADLINE_SCALE").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| s.is_finite() && *s > 0.0);
        let d = |secs: f64| Duration::from_secs_f64((secs * scale.unwrap_or(1.0)).min(86_400.0));
        Deadlines { quick: d(20.0), catalog: d(120.0), compute: d(600.0) }
    }

    /// The limit for a call, by its name.
    pub fn for_call(&self, call: &str) -> Duration {
        match call {
            "catalog.describe" | "catalog.manifest" => self.catalog,
            "runtime.model.load" | "model.forward" | "runtime.self-test" => self.compute,
            _ => self.quick,
        }
    }
}

/// Physical memory of this machine, in bytes (None if it cannot be read).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            // A few hundred ms of guest compute (measured: an endless loop is stopped after ~0.35 s);
            // rendering a template or building a forward graph needs well under 1 % of it.
            fuel_per_call: 10_000_000_000,
            max_tensor_handles: 100_000,
            // Half of physical memory: room for the weights and the caches, and for the rest of the
            // system. 4 GiB when the machine does not say.
            max_tensor_bytes: physical_memory().map_or(4 << 30, |m| m / 2),
            deadlines: Deadlines::from_env(),
        }
    }
}

pub struct HostState {
    /// The adapter's name, for logs and errors.
    pub adapter: String,
    pub table: ResourceTable,
    pub limits: MemoryLimits,
    pub tensors: tensor::Tensors,
    pub weights: Option<weights::OpenCheckpoint>,
    pub net: net::NetPolicy,
    /// When the current adapter call must end; None between calls.
    pub deadline: Option<Instant>,
}

impl HostState {
    pub fn new(adapter: &str, limits: &Limits) -> Self {
        HostState {
            adapter: adapter.to_owned(),
            table: ResourceTable::new(),
            limits: MemoryLimits {
                limits: StoreLimitsBuilder::new().memory_size(limits.memory_bytes).instances(4).tables(16).memories(4).trap_on_grow_failure(true).build(),
                peak_memory: 0,
            },
            tensors: tensor::Tensors::new(limits.max_tensor_handles, limits.max_tensor_bytes),
            weights: None,
            net: net::NetPolicy::default(),
            deadline: None,
        }
    }

    /// Stops the adapter call (a trap) once its time is up: checked on entry to every host call, so
    /// time spent in the host counts too.
    pub fn check_deadline(&self) -> wasmtime::Result<()> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(wasmtime::Error::new(DeadlinePassed)),
            _ => Ok(()),
        }
    }
}

/// wasmtime's store limits, remembering the largest linear memory the adapter asked for.
pub struct MemoryLimits {
    limits: StoreLimits,
    pub peak_memory: usize,
}

impl ResourceLimiter for MemoryLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The error a host call returns when the adapter call's time is up.
#[derive(Debug, thiserror::Error)]
#[error("the call's time limit passed")]
pub struct DeadlinePassed;
