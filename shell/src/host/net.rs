//! The `net` import: HTTP GET for catalog look-ups, only to the hosts the adapter declared ("hub" means
//! the configured hub endpoint). Every URL and redirect decision is the hub module's ([`Hub::send`]);
//! this module adds what is particular to adapters: their declared hosts, a body cap, and the time left
//! in the adapter call.

use crate::adapter::bindings::edgechat::adapter::net::{Host, Response};
use crate::host::HostState;
use crate::hub::{Hub, Reach};
use reqwest::header::{HeaderName, HeaderValue};
use std::io::Read;
use std::time::{Duration, Instant};

/// Largest response body an adapter may receive.
pub const MAX_BODY: u64 = 16 << 20;
/// Longest a single look-up may take, even with time left in the call.
const MAX_REQUEST_TIME: Duration = Duration::from_secs(60);

/// Where an adapter may reach.
#[derive(Debug, Clone)]
pub struct NetPolicy {
    /// The configured hub; None when its endpoint is malformed (then every request says so).
    pub hub: Result<Hub, String>,
    pub reach: Reach,
    /// Whether the adapter declared "hub".
    pub wants_hub: bool,
}

impl Default for NetPolicy {
    fn default() -> Self {
        NetPolicy { hub: Err("no network for this adapter".into()), reach: Reach::default(), wants_hub: false }
    }
}

impl NetPolicy {
    pub fn new(adapter: &str, declared: &[String]) -> NetPolicy {
        NetPolicy {
            hub: Hub::from_env().map_err(|e| format!("{e:#}")),
            reach: Reach::declared(adapter, declared),
            wants_hub: declared.iter().any(|h| h == "hub"),
        }
    }

    pub fn get(&self, url: &str, headers: &[(String, String)], deadline: Option<Instant>) -> Result<Response, String> {
        let hub = self.hub.as_ref().map_err(Clone::clone)?;
        let url = hub.resolve(url)?;
        if hub.is_hub(&url) && !self.wants_hub {
            return Err(format!("host {} is not among the hosts this adapter declared", url.host_str().unwrap_or("")));
        }
        let mut parsed = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{:?} is not a header name", crate::text::printable(name, 80)))?;
            let value = HeaderValue::from_str(value).map_err(|_| format!("the value of header {name} is not valid"))?;
            parsed.push((name, value));
        }
        let left = match deadline {
            Some(d) => d.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or("the adapter call's time limit has passed")?,
            None => MAX_REQUEST_TIME,
        };
        let client = hub.client(Some(left.min(MAX_REQUEST_TIME))).map_err(|e| format!("{e:#}"))?;
        let shown = crate::text::printable(url.as_str(), 300);
        let response = hub.send(&client, url, &parsed, &self.reach)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
            .collect();
        let mut body = Vec::new();
        response.take(MAX_BODY + 1).read_to_end(&mut body).map_err(|e| format!("GET {shown}: {e}"))?;
        if body.len() as u64 > MAX_BODY {
            return Err(format!("GET {shown}: response larger than {} MiB", MAX_BODY >> 20));
        }
        Ok(Response { status, headers, body })
    }
}

impl Host for HostState {
    fn get(&mut self, url: String, headers: Vec<(String, String)>) -> wasmtime::Result<Result<Response, String>> {
        self.check_deadline()?;
        Ok(self.net.get(&url, &headers, self.deadline))
    }
}
