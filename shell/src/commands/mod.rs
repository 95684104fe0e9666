//! The CLI commands, one per file. Each opens a [`Shell`](crate::shell::Shell) and does one thing.

pub mod adapters;
pub mod bench;
pub mod chat;
pub mod doctor;
pub mod history;
pub mod import;
pub mod models;
pub mod prompt;
pub mod pull;
pub mod rm;
pub mod run;
pub mod select;
pub mod serve;
