//! The `net` import: HTTP GET for catalog look-ups, only to the hosts the adapter declared ("hub" means
//! the configured hub endpoint). Bodies are capped; redirects must stay on allowed hosts.

use crate::adapter::bindings::edgechat::adapter::net::{Host, Response};
use crate::host::HostState;
use crate::hub::Hub;
use std::io::Read;

/// Largest response body an adapter may receive.
pub const MAX_BODY: u64 = 16 << 20;

/// Which hosts an adapter may reach.
#[derive(Debug, Clone, Default)]
pub struct NetPolicy {
    pub allowed_hosts: Vec<String>,
    /// The hub, when the adapter declared "hub".
    pub hub: Option<Hub>,
}

impl NetPolicy {
    pub fn new(declared: &[String], hub: Hub) -> NetPolicy {
        let wants_hub = declared.iter().any(|h| h == "hub");
        let mut allowed_hosts: Vec<String> = declared.iter().filter(|h| *h != "hub").map(|h| h.to_ascii_lowercase()).collect();
        if wants_hub {
            allowed_hosts.extend(hub.host());
        }
        NetPolicy { allowed_hosts, hub: wants_hub.then_some(hub) }
    }

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

    fn get(&self, url: &str, headers: &[(String, String)]) -> Result<Response, String> {
        let hub = self.hub.clone().unwrap_or_else(Hub::from_env);
        let url = hub.resolve(url);
        self.check(&url)?;
        let allowed = self.allowed_hosts.clone();
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let host = attempt.url().host_str().map(str::to_ascii_lowercase);
                if attempt.previous().len() > 5 {
                    attempt.error("too many redirects")
                } else if host.is_some_and(|h| allowed.contains(&h)) {
                    attempt.follow()
                } else {
                    attempt.error("redirect to a host the adapter did not declare")
                }
            }))
            .build()
            .map_err(|e| e.to_string())?;
        let mut request = hub.get(&client, &url);
        for (name, value) in headers {
            if !name.eq_ignore_ascii_case("authorization") {
                request = request.header(name, value);
            }
        }
        let response = request.send().map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
            .collect();
        let mut body = Vec::new();
        response.take(MAX_BODY + 1).read_to_end(&mut body).map_err(|e| format!("GET {url}: {e}"))?;
        if body.len() as u64 > MAX_BODY {
            return Err(format!("GET {url}: response larger than {} MiB", MAX_BODY >> 20));
        }
        Ok(Response { status, headers, body })
    }
}

impl Host for HostState {
    fn get(&mut self, url: String, headers: Vec<(String, String)>) -> wasmtime::Result<Result<Response, String>> {
        Ok(self.net.get(&url, &headers))
    }
}
