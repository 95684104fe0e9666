//! The model hub as edgechat reaches it: the endpoint (`EDGECHAT_HUB_ENDPOINT`, else `HF_ENDPOINT`, else
//! huggingface.co), `hub:` URLs (adapters write hub paths as `hub:/api/models/...` and never need to know
//! the endpoint), and the HTTP client, which sends `HF_TOKEN` to the hub's host only.

use anyhow::{Context, Result};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, Clone)]
pub struct Hub {
    /// Without a trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
}

impl Hub {
    pub fn from_env() -> Hub {
        let endpoint = ["EDGECHAT_HUB_ENDPOINT", "HF_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Hub { endpoint: endpoint.trim_end_matches('/').to_owned(), token }
    }

    pub fn host(&self) -> Option<String> {
        crate::host::net::NetPolicy::host_of(&self.endpoint)
    }

    /// `hub:/path` -> `<endpoint>/path`; other URLs unchanged.
    pub fn resolve(&self, url: &str) -> String {
        match url.strip_prefix("hub:") {
            Some(path) => format!("{}/{}", self.endpoint, path.trim_start_matches('/')),
            None => url.to_owned(),
        }
    }

    pub fn client(&self) -> Result<reqwest::blocking::Client> {
        reqwest::blocking::Client::builder()
            .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            // Reads may stall on a slow link; a stalled read times out and the download retries/resumes.
            .timeout(None)
            .build()
            .context("creating the HTTP client")
    }

    /// A GET with the token attached when (and only when) `url` is on the hub's host. reqwest drops the
    /// Authorization header on redirects to other hosts (the hub's CDN).
    pub fn get(&self, client: &reqwest::blocking::Client, url: &str) -> reqwest::blocking::RequestBuilder {
        let request = client.get(url);
        match (&self.token, self.host()) {
            (Some(token), Some(host)) if crate::host::net::NetPolicy::host_of(url).as_deref() == Some(host.as_str()) => request.bearer_auth(token),
            _ => request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(hub: &Hub, url: &str) -> Option<String> {
        let client = hub.client().unwrap();
        let request = hub.get(&client, url).build().unwrap();
        request.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn the_token_goes_to_the_hub_host_only() {
        let hub = Hub { endpoint: "https://hub.example".into(), token: Some("secret".into()) };
        assert_eq!(auth(&hub, "https://hub.example/api/models/a/b").as_deref(), Some("Bearer secret"));
        assert_eq!(auth(&hub, "https://cdn.example/file"), None);
        assert_eq!(auth(&hub, "https://hub.example.evil.com/x"), None);
        let anonymous = Hub { endpoint: "https://hub.example".into(), token: None };
        assert_eq!(auth(&anonymous, "https://hub.example/x"), None);
    }

    #[test]
    fn hub_urls_resolve_against_the_endpoint() {
        let hub = Hub { endpoint: "http://127.0.0.1:8080".into(), token: None };
        assert_eq!(hub.resolve("hub:/api/models/a/b"), "http://127.0.0.1:8080/api/models/a/b");
        assert_eq!(hub.resolve("https://other/x"), "https://other/x");
    }
}
