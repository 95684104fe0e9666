//! The model hub as edgechat reaches it, and every outgoing HTTP request of the shell.
//!
//! One parser decides everything: `url::Url`, the parser reqwest itself uses, so no check can disagree
//! with the request that follows it (backslashes, userinfo, percent-encoding, IDNA, IP literals written
//! in other notations, default ports). The rules, each enforced at one place below:
//!
//! - The hub is `EDGECHAT_HUB_ENDPOINT`, else `HF_ENDPOINT`, else huggingface.co; adapters write hub
//!   paths as `hub:/api/models/...` and never need to know it.
//! - `HF_TOKEN` is attached to a request (first hop or redirect) iff its origin — scheme, host and port —
//!   is the hub's. reqwest follows no redirect on its own: [`Hub::send`] walks them, so the decision is
//!   made again at every hop.
//! - The first request goes to the hub origin or, over https, to a host the caller allows ([`Reach`]).
//!   Redirects stay on the hub origin, or go over https (to the hub's CDN) without credentials.
//! - No hop reaches a loopback, link-local, private or otherwise non-public address, by IP literal or by
//!   DNS answer, unless the configured hub itself is on such an address (a hub on this machine or LAN).

use anyhow::{bail, Context, Result};
use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, LOCATION};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use url::{Host, Url};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Redirect hops followed per request (the hub's CDN needs one or two).
const MAX_REDIRECTS: usize = 8;

#[derive(Debug, Clone)]
pub struct Hub {
    /// The configured endpoint, parsed: http(s), no credentials, path ending in `/`.
    pub endpoint: Url,
    pub token: Option<String>,
}

/// Who may be reached by the first request: the hub, plus these hosts over https.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub hosts: Vec<Host<String>>,
    /// Where redirects may go: anywhere over https (downloads from a CDN), or only to the hub and `hosts`.
    pub redirects_anywhere: bool,
}

impl Reach {
    /// An adapter's declared hosts; "hub" (the configured hub) is always reachable and so is skipped.
    /// A declaration that is not a plain host name is ignored with a warning (it can never match).
    pub fn declared(adapter: &str, declared: &[String]) -> Reach {
        let hosts = declared
            .iter()
            .filter(|h| h.as_str() != "hub")
            .filter_map(|h| match Host::parse(h) {
                Ok(host) if host.to_string() == h.to_ascii_lowercase() => Some(host),
                _ => {
                    tracing::warn!("adapter {adapter}: allowed host {h:?} is not a host name; ignored");
                    None
                }
            })
            .collect();
        Reach { hosts, redirects_anywhere: false }
    }
}

/// Scheme, host and port: what "the same server" means for credentials and allow-lists.
fn origin(url: &Url) -> (&str, Option<Host<&str>>, Option<u16>) {
    (url.scheme(), url.host(), url.port_or_known_default())
}

/// Parses an http(s) URL the way the HTTP client will, refusing what a request must never carry.
pub fn parse_http(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{:?} is not a valid URL: {e}", crate::text::printable(text, 200)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{} is not an http(s) URL", crate::text::printable(text, 200)));
    }
    if url.host().is_none() {
        return Err(format!("{} has no host", crate::text::printable(text, 200)));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{} carries credentials in the URL; refused", url.host_str().unwrap_or("")));
    }
    Ok(url)
}

/// Whether an address is not on the public internet: loopback, private, link-local, CGNAT, unique-local,
/// unspecified, multicast, broadcast, documentation, or an IPv4 address hidden in an IPv6 one.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // CGNAT
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || first == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || first == 0x0064 && v6.segments()[1] == 0xff9b // NAT64 of an IPv4 address
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible
        }
    }
}

/// A DNS resolver that drops non-public answers, so a public-looking name cannot lead to this machine
/// or its network (including a name that resolves differently on the second look-up).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let lookup = host.clone();
            let found: Vec<SocketAddr> = tokio::task::spawn_blocking(move || (lookup.as_str(), 0).to_socket_addrs().map(Iterator::collect))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)??;
            let public: Vec<SocketAddr> = found.into_iter().filter(|a| !is_non_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} resolves only to non-public addresses; refused").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Hub {
    /// The configured hub. A malformed endpoint is an error, never a silent fallback.
    pub fn from_env() -> Result<Hub> {
        let (name, endpoint) = ["EDGECHAT_HUB_ENDPOINT", "HF_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()).map(|v| (*k, v)))
            .unwrap_or(("default", DEFAULT_ENDPOINT.to_owned()));
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Hub::new(&endpoint, token).with_context(|| format!("the hub endpoint ({name})"))
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Result<Hub> {
        let mut url = parse_http(endpoint).map_err(anyhow::Error::msg)?;
        if url.query().is_some() || url.fragment().is_some() {
            bail!("{endpoint} has a query or fragment; give the hub's base URL");
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Hub { endpoint: url, token })
    }

    /// Whether the hub itself is on a non-public address: then so may the rest be (tests, a LAN mirror).
    pub fn is_local(&self) -> bool {
        match self.endpoint.host() {
            Some(Host::Ipv4(ip)) => is_non_public(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => is_non_public(IpAddr::V6(ip)),
            Some(Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
            None => false,
        }
    }

    pub fn is_hub(&self, url: &Url) -> bool {
        origin(url) == origin(&self.endpoint)
    }

    /// `hub:/path` -> the path on the endpoint; any other text must be an http(s) URL. Either way the
    /// result is parsed once, here.
    pub fn resolve(&self, url: &str) -> Result<Url, String> {
        match url.strip_prefix("hub:") {
            Some(path) => {
                let joined = self
                    .endpoint
                    .join(path.trim_start_matches(['/', '\\']))
                    .map_err(|e| format!("hub path {:?} is not valid: {e}", crate::text::printable(path, 200)))?;
                if !self.is_hub(&joined) {
                    return Err(format!("hub path {:?} leaves the hub", crate::text::printable(path, 200)));
                }
                Ok(joined)
            }
            None => parse_http(url),
        }
    }

    /// The HTTP client for hub traffic: no automatic redirects (see [`Hub::send`]) and, unless the hub is
    /// local, a resolver that refuses non-public addresses. `timeout` bounds a whole request.
    pub fn client(&self, timeout: Option<Duration>) -> Result<Client> {
        let mut builder = Client::builder()
            .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            // Reads may stall on a slow link; downloads retry and resume, adapter calls pass a deadline.
            .timeout(timeout);
        if !self.is_local() {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        builder.build().context("creating the HTTP client")
    }

    /// Why a first request to `url` is refused, if it is (manifests are checked with this before any
    /// download starts).
    pub fn refuse_first_hop(&self, url: &Url, reach: &Reach) -> Option<String> {
        self.refuse_hop(url, reach, true)
    }

    /// Why a hop to `url` is refused, if it is.
    fn refuse_hop(&self, url: &Url, reach: &Reach, first: bool) -> Option<String> {
        let host = url.host_str().unwrap_or("");
        if !self.is_hub(url) {
            let declared = url.host().is_some_and(|host| reach.hosts.contains(&host.to_owned()));
            if !declared && (first || !reach.redirects_anywhere) {
                let what = if first { "host" } else { "redirect to host" };
                return Some(format!("{what} {host} is not among the hosts this adapter declared"));
            }
            if url.scheme() != "https" {
                return Some(format!("{host} is not the hub and would be reached over plain http"));
            }
            if first && url.port_or_known_default() != Some(443) {
                return Some(format!("{host} is declared for https on port 443 only"));
            }
        }
        if !self.is_local() {
            let ip = match url.host() {
                Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
                Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            };
            if ip.is_some_and(is_non_public) {
                return Some(format!("{host} is not a public address"));
            }
        }
        None
    }

    /// Sends a GET to `url` (already resolved), following redirects by hand: each hop is checked against
    /// `reach`, and the token goes exactly to hops on the hub origin. `headers` are the caller's own;
    /// credentials among them are dropped.
    pub fn send(&self, client: &Client, url: Url, headers: &[(HeaderName, HeaderValue)], reach: &Reach) -> Result<Response, SendError> {
        let mut url = url;
        for hop in 0..=MAX_REDIRECTS {
            if let Some(why) = self.refuse_hop(&url, reach, hop == 0) {
                return Err(SendError::Refused(why));
            }
            let mut request_headers = HeaderMap::new();
            for (name, value) in headers {
                if !is_credential(name) {
                    request_headers.append(name.clone(), value.clone());
                }
            }
            if let (Some(token), true) = (&self.token, self.is_hub(&url)) {
                let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| SendError::Refused("HF_TOKEN is not a valid header value".into()))?;
                request_headers.insert(AUTHORIZATION, value);
            }
            let shown = crate::text::printable(url.as_str(), 300);
            let response = client.get(url.clone()).headers(request_headers).send().map_err(|e| SendError::Network(format!("GET {shown}: {}", with_causes(&e))))?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| SendError::Refused(format!("GET {shown}: a redirect without a usable Location")))?;
            url = url.join(location).map_err(|e| SendError::Refused(format!("GET {shown}: redirect to an invalid URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || !url.username().is_empty() || url.password().is_some() {
                return Err(SendError::Refused(format!("GET {shown}: redirect to a URL that is not plain http(s); refused")));
            }
        }
        Err(SendError::Refused(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// Why [`Hub::send`] got no response: a policy refusal (final) or a network failure (worth a retry).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Network(String),
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.to_string()
    }
}

/// An error with its causes: reqwest's own message ("error sending request") hides why.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

/// Headers only the shell may set.
fn is_credential(name: &HeaderName) -> bool {
    [AUTHORIZATION, reqwest::header::PROXY_AUTHORIZATION, reqwest::header::COOKIE, reqwest::header::HOST].contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(endpoint: &str) -> Hub {
        Hub::new(endpoint, Some("secret".into())).unwrap()
    }

    fn reach(hosts: &[&str]) -> Reach {
        Reach::declared("test", &hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_hub_origin_is_scheme_host_and_port() {
        let h = hub("https://hub.example");
        for same in ["https://hub.example/x", "https://HUB.example:443/x", "https://hub.example/a/../b", "https://hub.ex%61mple/x"] {
            assert!(h.is_hub(&parse_http(same).unwrap()), "{same}");
        }
        for other in [
            "http://hub.example/x",
            "https://hub.example:8443/x",
            "https://hub.example./x",
            "https://hub.example.evil.com/x",
            "https://evil.com\\@hub.example/x",
            "https://xn--hub-example/x",
        ] {
            let parsed = parse_http(other);
            assert!(parsed.map_or(true, |u| !h.is_hub(&u)), "{other}");
        }
        // Userinfo is refused outright: `https://hub.example@evil.com` goes to evil.com.
        assert!(parse_http("https://hub.example@evil.com/x").is_err());
        assert!(parse_http("https://user:pw@hub.example/x").is_err());
    }

    #[test]
    fn hub_paths_resolve_on_the_endpoint_and_cannot_leave_it() {
        let h = hub("http://127.0.0.1:8080");
        assert_eq!(h.resolve("hub:/api/models/a/b").unwrap().as_str(), "http://127.0.0.1:8080/api/models/a/b");
        for escape in ["hub://evil.com/x", "hub:\\\\evil.com/x", "hub:/%2F%2Fevil.com", "hub:http://evil.com/"] {
            let url = h.resolve(escape);
            assert!(url.as_ref().map_or(true, |u| h.is_hub(u)), "{escape} -> {url:?}");
        }
        assert_eq!(h.resolve("https://other.example/x").unwrap().host_str(), Some("other.example"));
        assert!(h.resolve("file:///etc/passwd").is_err());
        assert!(h.resolve("ftp://x/y").is_err());
    }

    #[test]
    fn first_hops_go_to_the_hub_or_declared_https_hosts() {
        let h = hub("https://hub.example");
        let r = reach(&["hub", "cdn.example"]);
        let refused = |u: &str| h.refuse_hop(&parse_http(u).unwrap(), &r, true);
        assert_eq!(refused("https://hub.example/x"), None);
        assert_eq!(refused("https://cdn.example/x"), None);
        assert_eq!(refused("https://CDN.example:443/x"), None);
        assert!(refused("http://cdn.example/x").is_some(), "declared hosts over https only");
        assert!(refused("https://cdn.example:444/x").is_some());
        assert!(refused("https://cdn.example./x").is_some());
        assert!(refused("https://other.example/x").is_some());
        assert!(refused("http://hub.example/x").is_some(), "plain http is not the https hub");
    }

    #[test]
    fn non_public_addresses_are_refused_unless_the_hub_is_local() {
        let h = hub("https://hub.example");
        let r = Reach { hosts: vec![], redirects_anywhere: true };
        for ip in [
            "https://127.0.0.1/x",
            "https://0x7f.1/x",
            "https://2130706433/x",
            "https://0177.0.0.1/x",
            "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://169.254.169.254/latest",
            "https://10.0.0.1/x",
            "https://192.168.1.1/x",
            "https://[fd00::1]/x",
            "https://0.0.0.0/x",
            "https://100.64.0.1/x",
        ] {
            let url = parse_http(ip).unwrap();
            assert!(h.refuse_hop(&url, &r, false).is_some(), "{ip} -> {url}");
        }
        assert_eq!(h.refuse_hop(&parse_http("https://cdn.example/x").unwrap(), &r, false), None);
        let local = hub("http://127.0.0.1:9");
        assert_eq!(local.refuse_hop(&parse_http("https://10.0.0.1/x").unwrap(), &r, false), None);
    }

    #[test]
    fn names_resolving_to_non_public_addresses_are_refused_at_connect() {
        // `localhost` passes the literal-address check (it is a name); the resolver must catch it.
        let h = hub("https://hub.example");
        let reach = Reach { hosts: vec![Host::Domain("localhost".into())], redirects_anywhere: false };
        let url = parse_http("https://localhost/x").unwrap();
        assert_eq!(h.refuse_first_hop(&url, &reach), None);
        let err = h.send(&h.client(Some(Duration::from_secs(10))).unwrap(), url, &[], &reach).unwrap_err().to_string();
        assert!(err.contains("resolves only to non-public addresses"), "{err}");
    }

    #[test]
    fn a_bad_endpoint_is_an_error() {
        for bad in ["huggingface.co", "ftp://x", "https://user:pw@hub.example", "https://hub.example/?q=1", "https://"] {
            assert!(Hub::new(bad, None).is_err(), "{bad}");
        }
        assert_eq!(hub("https://hub.example/mirror").resolve("hub:/a").unwrap().as_str(), "https://hub.example/mirror/a");
    }
}
