//! edgechat: on-device chat with small language models. A native shell hosting one WebAssembly runtime
//! adapter per model family; the adapters format prompts and define model graphs, the shell executes
//! tensors with MLX. See docs/architecture.md.

pub mod adapter;
pub mod catalog;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod conformance;
pub mod db;
pub mod download;
pub mod download_plan;
pub mod engine;
pub mod generate;
pub mod host;
pub mod hub;
pub mod models;
pub mod paths;
pub mod registry;
pub mod sampler;
pub mod server;
pub mod shell;
pub mod text;
pub mod tokenizer;
pub mod updates;
