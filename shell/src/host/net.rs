//! The `net` import: HTTP GET for catalog look-ups, only to the hosts the adapter declared.

use crate::adapter::bindings::edgechat::adapter::net::{Host, Response};
use crate::host::HostState;

/// Which hosts an adapter may reach: its declared `allowed-hosts`, with "hub" meaning the configured hub.
#[derive(Debug, Clone, Default)]
pub struct NetPolicy {
    pub allowed_hosts: Vec<String>,
}

impl NetPolicy {
    /// The host part of an http(s) URL, lower-cased.
    pub fn host_of(url: &str) -> Option<String> {
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
        let authority = rest.split(['/', '?', '#']).next()?;
        let host = authority.rsplit('@').next()?;
        let host = if let Some(v6) = host.strip_prefix('[') { v6.split(']').next()? } else { host.split(':').next()? };
        (!host.is_empty()).then(|| host.to_ascii_lowercase())
    }

    pub fn check(&self, url: &str) -> Result<(), String> {
        let host = Self::host_of(url).ok_or_else(|| format!("not an http(s) URL: {url}"))?;
        if self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
            Ok(())
        } else {
            Err(format!("host {host} is not among the hosts this adapter declared"))
        }
    }
}

impl Host for HostState {
    fn get(&mut self, url: String, _headers: Vec<(String, String)>) -> wasmtime::Result<Result<Response, String>> {
        if let Err(e) = self.net.check(&url) {
            return Ok(Err(e));
        }
        Ok(Err(format!("GET {url}: this edgechat version has no network client for adapters yet")))
    }
}
