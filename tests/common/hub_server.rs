//! A local stand-in for the model hub, on 127.0.0.1, for download tests: the model-info API with LFS
//! hashes and sizes, `resolve` URLs that redirect to a CDN path with `X-Repo-Commit`, `X-Linked-Etag`
//! and `X-Linked-Size`, byte ranges (206), and faults injected per file: a dropped connection, a
//! flipped byte, 500s, a slow link, a gated repository.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Faults {
    /// Close the connection after this many body bytes, once per entry.
    pub drop_after: HashMap<String, Vec<u64>>,
    /// Flip one byte of the body this many times.
    pub flip: HashMap<String, u32>,
    /// Answer 500 this many times.
    pub fail: HashMap<String, u32>,
    /// Sleep this long per 16 KiB of body.
    pub delay_per_chunk: Duration,
    /// Repositories that need `Authorization: Bearer <token>`.
    pub gated: HashMap<String, String>,
    /// Sizes the listing claims instead of the real ones.
    pub listed_size: HashMap<String, u64>,
    /// Files the listing gives no size for.
    pub without_size: Vec<String>,
    /// Where `resolve` redirects to instead of this server's own /cdn/ (another origin).
    pub cdn: Option<String>,
    /// Files served with a 206 whose Content-Range starts elsewhere than asked.
    pub wrong_range: Vec<String>,
}

#[derive(Clone)]
pub struct File {
    pub name: String,
    pub data: Arc<Vec<u8>>,
    /// Weights are LFS files (the listing gives their sha256); small files are not.
    pub lfs: bool,
}

pub struct Repo {
    pub sha: String,
    pub files: Vec<File>,
}

#[derive(Default)]
pub struct State {
    pub repos: HashMap<String, Repo>,
    pub faults: Faults,
    /// (path, Range header, had Authorization)
    pub requests: Vec<(String, Option<String>, bool)>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        FakeHub { url, state }
    }

    pub fn add_repo(&self, repo: &str, files: Vec<File>) {
        let sha = sha256(repo.as_bytes())[..40].to_owned();
        self.state.lock().unwrap().repos.insert(repo.to_owned(), Repo { sha, files });
    }

    pub fn faults(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    let mut auth = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        let (k, v) = header.split_once(':').unwrap_or(("", ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_owned()),
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    state.lock().unwrap().requests.push((path.clone(), range.clone(), auth.is_some()));
    let route = path.split('?').next().unwrap_or("").to_owned();
    let not_found = |s: &mut TcpStream| respond(s, "404 Not Found", &[], br#"{"error":"Repository not found"}"#);

    // Which repository, and is the caller allowed in?
    let repo_name = if let Some(rest) = route.strip_prefix("/api/models/") {
        rest.split("/revision/").next().unwrap_or("").to_owned()
    } else if let Some((repo, _)) = route.trim_start_matches('/').split_once("/resolve/") {
        repo.to_owned()
    } else {
        String::new()
    };
    if let Some(token) = state.lock().unwrap().faults.gated.get(&repo_name).cloned() {
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            return respond(&mut stream, "401 Unauthorized", &[], b"{\"error\":\"Access to this repository is restricted\"}");
        }
    }

    if route.starts_with("/api/models/") {
        let st = state.lock().unwrap();
        let Some(repo) = st.repos.get(&repo_name) else { return not_found(&mut stream) };
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let size = st.faults.listed_size.get(&f.name).copied().unwrap_or(f.data.len() as u64);
                let mut s = serde_json::json!({ "rfilename": f.name, "size": size });
                if st.faults.without_size.contains(&f.name) {
                    s.as_object_mut().unwrap().remove("size");
                }
                if f.lfs {
                    s["lfs"] = serde_json::json!({ "sha256": sha256(&f.data), "size": size, "pointerSize": 134 });
                }
                s
            })
            .collect();
        let body = serde_json::json!({ "id": repo_name, "sha": repo.sha, "siblings": siblings }).to_string();
        return respond(&mut stream, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes());
    }

    if let Some((repo, rest)) = route.trim_start_matches('/').split_once("/resolve/") {
        // /<repo>/resolve/<revision>/<file>: redirect to the "CDN", as the hub does for LFS files.
        let st = state.lock().unwrap();
        let Some(r) = st.repos.get(repo) else { return not_found(&mut stream) };
        let (_revision, name) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(file) = r.files.iter().find(|f| f.name == name) else { return not_found(&mut stream) };
        let headers = vec![
            ("Location".into(), format!("{}/cdn/{repo}/{name}", st.faults.cdn.clone().unwrap_or_default())),
            ("X-Repo-Commit".into(), r.sha.clone()),
            ("X-Linked-Etag".into(), format!("\"{}\"", sha256(&file.data))),
            ("X-Linked-Size".into(), file.data.len().to_string()),
        ];
        return respond(&mut stream, "302 Found", &headers, b"");
    }

    if let Some(rest) = route.strip_prefix("/cdn/") {
        let (file, key) = {
            let st = state.lock().unwrap();
            let Some((repo, name)) = rest.rsplit_once('/') else { return not_found(&mut stream) };
            let Some(file) = st.repos.get(repo).and_then(|r| r.files.iter().find(|f| f.name == name)).cloned() else {
                return not_found(&mut stream);
            };
            (file, name.to_owned())
        };
        let (fail, flip, drop_after, delay) = {
            let mut st = state.lock().unwrap();
            let faults = &mut st.faults;
            let fail = faults.fail.get_mut(&key).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
            let flip = faults.flip.get_mut(&key).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
            let drop_after = faults.drop_after.get_mut(&key).and_then(|v| if v.is_empty() { None } else { Some(v.remove(0)) });
            (fail, flip, drop_after, faults.delay_per_chunk)
        };
        if fail {
            return respond(&mut stream, "500 Internal Server Error", &[], b"try again");
        }
        let total = file.data.len() as u64;
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if start >= total && total > 0 {
            return respond(&mut stream, "416 Range Not Satisfiable", &[("Content-Range".into(), format!("bytes */{total}"))], b"");
        }
        let mut body = file.data[start as usize..].to_vec();
        if flip && !body.is_empty() {
            let mid = body.len() / 2;
            body[mid] ^= 0x40;
        }
        let etag = format!("\"{}\"", sha256(&file.data));
        let (status, mut headers): (&str, Vec<(String, String)>) = if range.is_some() {
            let claimed = if state.lock().unwrap().faults.wrong_range.contains(&key) { 0 } else { start };
            ("206 Partial Content", vec![("Content-Range".into(), format!("bytes {claimed}-{}/{total}", total.saturating_sub(1)))])
        } else {
            ("200 OK", vec![])
        };
        headers.push(("Accept-Ranges".into(), "bytes".into()));
        headers.push(("ETag".into(), etag));
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        let limit = drop_after.map_or(body.len(), |n| (n as usize).min(body.len()));
        for chunk in body[..limit].chunks(16 << 10) {
            stream.write_all(chunk)?;
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        }
        stream.flush()?;
        return Ok(()); // dropping the stream closes the connection, short if drop_after cut it
    }
    not_found(&mut stream)
}
