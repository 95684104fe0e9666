//! `edgechat serve`: the OpenAI-compatible HTTP API (see [`crate::server`]).

use crate::server::{self, Options};
use crate::shell::Shell;
use anyhow::Result;
use std::net::IpAddr;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 11435)]
    pub port: u16,
    /// Load this model at start (requests may name others; one is resident at a time).
    #[arg(long)]
    pub model: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Let web pages from this origin call the API (CORS), e.g. http://localhost:3000.
    #[arg(long)]
    pub cors_origin: Option<String>,
    /// Requests that may wait while one generates; more get 503 with Retry-After.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let shell = Shell::open()?;
    server::serve(shell, Options { host: args.host, port: args.port, model: args.model, api_key: args.api_key, cors_origin: args.cors_origin, queue: args.queue.max(1) })
}
