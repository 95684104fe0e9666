//! Host capabilities imported by adapters, one module per WIT interface, all on [`HostState`]: the data
//! of one adapter's wasmtime store.

pub mod log;
pub mod net;
pub mod tensor;
pub mod weights;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};

/// Sandbox limits for one adapter instance.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory of the adapter.
    pub memory_bytes: usize,
    /// Wasm instructions (fuel) per call into the adapter; host time is not counted.
    pub fuel_per_call: u64,
    pub max_tensor_handles: usize,
    /// Bytes of all live tensors the adapter holds handles to.
    pub max_tensor_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            // A few hundred ms of guest compute (measured: an endless loop is stopped after ~0.35 s);
            // rendering a template or building a forward graph needs well under 1 % of it.
            fuel_per_call: 10_000_000_000,
            max_tensor_handles: 100_000,
            max_tensor_bytes: 64 << 30,
        }
    }
}

pub struct HostState {
    /// The adapter's name, for logs and errors.
    pub adapter: String,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    pub tensors: tensor::Tensors,
    pub weights: Option<weights::OpenCheckpoint>,
    pub net: net::NetPolicy,
}

impl HostState {
    pub fn new(adapter: &str, limits: &Limits) -> Self {
        HostState {
            adapter: adapter.to_owned(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(limits.memory_bytes).instances(4).tables(16).memories(4).trap_on_grow_failure(true).build(),
            tensors: tensor::Tensors::new(limits.max_tensor_handles, limits.max_tensor_bytes),
            weights: None,
            net: net::NetPolicy::default(),
        }
    }
}
