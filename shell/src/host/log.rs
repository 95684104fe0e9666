//! The `log` import: adapter diagnostics into the shell's tracing log, tagged with the adapter's name.

use crate::adapter::bindings::edgechat::adapter::log::{Host, Level};
use crate::host::HostState;

/// Longest message kept; an adapter cannot flood the terminal with one call.
const MAX_MESSAGE: usize = 4096;

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        let adapter = self.adapter.as_str();
        match level {
            Level::Trace => tracing::trace!(adapter, "{message}"),
            Level::Debug => tracing::debug!(adapter, "{message}"),
            Level::Info => tracing::info!(adapter, "{message}"),
            Level::Warn => tracing::warn!(adapter, "{message}"),
            Level::Error => tracing::error!(adapter, "{message}"),
        }
        Ok(())
    }
}
