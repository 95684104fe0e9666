//! The `weights` import: the one checkpoint the shell opened for the model an adapter is loading.
//! Readers for each format implement [`Checkpoint`]; outside a model load no checkpoint is open, and an
//! adapter that asks for weights then is stopped.

use crate::adapter::bindings::edgechat::adapter::weights::{CheckpointFormat, Entry, Host};
use crate::host::HostState;

pub trait Checkpoint: Send {
    fn format(&self) -> CheckpointFormat;
    fn config(&self) -> String;
    fn names(&self) -> Vec<String>;
    /// Loads one tensor into the store's table. Errors name the file and the tensor.
    fn get(&mut self, name: &str, state: &mut crate::host::tensor::Tensors, table: &mut wasmtime::component::ResourceTable) -> wasmtime::Result<Result<Entry, String>>;
}

impl HostState {
    fn checkpoint(&mut self) -> wasmtime::Result<&mut Box<dyn Checkpoint>> {
        self.weights.as_mut().ok_or_else(|| wasmtime::format_err!("adapter asked for weights outside of a model load"))
    }
}

impl Host for HostState {
    fn format(&mut self) -> wasmtime::Result<CheckpointFormat> {
        Ok(self.checkpoint()?.format())
    }

    fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.checkpoint()?.config())
    }

    fn names(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.checkpoint()?.names())
    }

    fn get(&mut self, name: String) -> wasmtime::Result<Result<Entry, String>> {
        let mut checkpoint = self.weights.take().ok_or_else(|| wasmtime::format_err!("adapter asked for weights outside of a model load"))?;
        let result = checkpoint.get(&name, &mut self.tensors, &mut self.table);
        self.weights = Some(checkpoint);
        result
    }
}
