//! The conformance kit: runs an adapter in the same sandbox as `run`, with no installed state, through
//! named cases. `edgechat adapters test` runs them all; `install` runs the ones that need no fixture
//! ([`smoke`]) and refuses a package that fails any.

mod fidelity;
mod standin_hub;

use crate::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Formatted, Message};
use crate::adapter::{Adapter, AdapterHost, Origin, Session, KNOWN_CONTRACTS};
use crate::catalog::Catalog;
use crate::hub::{Hub, Reach};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub millis: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub adapter: String,
    pub version: String,
    pub contract: String,
    pub cases: Vec<Case>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> String {
        self.cases.iter().filter(|c| !c.passed).map(|c| format!("{}: {}", c.name, c.detail)).collect::<Vec<_>>().join("; ")
    }
}

/// A model directory and the transformers reference for it (`sequences.<name>.input_ids`, `greedy_32`,
/// `last_logits_full`).
pub struct Fixture {
    pub model: PathBuf,
    pub reference: PathBuf,
}

/// Sandbox figures gathered across the cases: the slowest call and the memory high-water marks.
#[derive(Default)]
struct Usage {
    slowest: Option<(String, Duration)>,
    peak_memory: usize,
    peak_tensor_bytes: u64,
}

impl Usage {
    fn call(&mut self, name: &str, took: Duration) {
        if self.slowest.as_ref().is_none_or(|(_, d)| took > *d) {
            self.slowest = Some((name.to_owned(), took));
        }
    }

    fn session(&mut self, session: &Session) {
        if let Some(state) = session.state() {
            self.peak_memory = self.peak_memory.max(state.limits.peak_memory);
            self.peak_tensor_bytes = self.peak_tensor_bytes.max(state.tensors.peak_bytes);
        }
    }
}

struct Kit<'a> {
    adapter: &'a Adapter,
    cases: Vec<Case>,
    usage: Usage,
}

impl Kit<'_> {
    fn case(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<String>) {
        let started = Instant::now();
        let outcome = f(self);
        let millis = started.elapsed().as_secs_f64() * 1e3;
        let (passed, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(e) => (false, crate::text::printable(&format!("{e:#}"), 600)),
        };
        self.cases.push(Case { name: name.to_owned(), passed, detail, millis });
    }

    fn session(&self) -> Result<Session> {
        Ok(self.adapter.instantiate()?)
    }

    fn format(&mut self, session: &mut Session, messages: &[Message], generation_prompt: bool, tokenizer_config: Option<String>) -> Result<Formatted, crate::adapter::AdapterError> {
        let started = Instant::now();
        let result = session.format(messages, &FormatOptions { add_generation_prompt: generation_prompt, tokenizer_config });
        self.usage.call("prompt.format", started.elapsed());
        self.usage.session(session);
        result
    }

    fn report(self) -> Report {
        let info = &self.adapter.info;
        Report { adapter: info.name.clone(), version: info.version.clone(), contract: info.contract_version.clone(), cases: self.cases }
    }
}

/// The cases that need no fixture: contract, info, catalog, prompt, determinism, limits.
pub fn smoke(adapter: &Adapter) -> Report {
    let mut kit = Kit { adapter, cases: Vec::new(), usage: Usage::default() };
    run_smoke_cases(&mut kit);
    kit.case("limits", limits);
    kit.report()
}

/// Every case, on a component file loaded afresh (no compiled-code cache, no installed state).
pub fn test_component(path: &Path, fixtures: &[Fixture], templates: Option<&Path>) -> Result<Report> {
    let host = AdapterHost::new(crate::host::Limits::default(), None)?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let adapter = match host.load_bytes(&bytes, path, Origin::Development) {
        Ok(adapter) => adapter,
        Err(e) => {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let case = Case { name: "contract".into(), passed: false, detail: crate::text::printable(&format!("{e:#}"), 600), millis: 0.0 };
            return Ok(Report { adapter: name, version: String::new(), contract: String::new(), cases: vec![case] });
        }
    };
    let mut kit = Kit { adapter: &adapter, cases: Vec::new(), usage: Usage::default() };
    run_smoke_cases(&mut kit);
    if let Some(goldens) = templates {
        kit.case("templates", |kit| templates_case(kit, goldens));
    }
    for fixture in fixtures {
        let name = fixture.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        kit.case(&format!("fixture {name}"), |kit| fidelity::check(kit.adapter, fixture, &mut kit.usage));
    }
    kit.case("limits", limits);
    Ok(kit.report())
}

fn run_smoke_cases(kit: &mut Kit) {
    let contract = kit.adapter.info.contract_version.clone();
    // Loading already refused WASI and unknown interfaces (`verify_world`); say what was accepted.
    kit.case("contract", |_| Ok(format!("imports only edgechat:adapter interfaces at contract {contract}; exports the whole adapter world")));
    kit.case("info", |kit| info_case(kit.adapter));
    kit.case("catalog", catalog_case);
    kit.case("prompt", prompt_case);
    kit.case("determinism", determinism_case);
}

fn info_case(adapter: &Adapter) -> Result<String> {
    let info = &adapter.info;
    let version = semver::Version::parse(&info.version).with_context(|| format!("version {:?} is not semver", info.version))?;
    if !KNOWN_CONTRACTS.contains(&info.contract_version.as_str()) {
        bail!("contract {} is not one this shell knows ({})", info.contract_version, KNOWN_CONTRACTS.join(", "));
    }
    if info.families.is_empty() || info.architectures.is_empty() {
        bail!("it names no model family or no architecture");
    }
    for arch in &info.architectures {
        if arch.is_empty() || !arch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            bail!("architecture {arch:?} is not a config.json model_type (a-z, 0-9, _)");
        }
    }
    let reach = Reach::declared(&info.name, &info.allowed_hosts);
    let declared = info.allowed_hosts.iter().filter(|h| h.as_str() != "hub").count();
    if reach.hosts.len() != declared {
        bail!("allowed hosts {:?} include one that is not a plain host name", info.allowed_hosts);
    }
    Ok(format!("{} {version}: {} ({}); hosts: {}", info.name, info.families.join(", "), info.architectures.join(", "), info.allowed_hosts.join(", ")))
}

/// `describe` and `manifest` for the adapter's entries in the built-in catalog, against the stand-in
/// hub; every manifest is validated as `pull` validates it.
fn catalog_case(kit: &mut Kit) -> Result<String> {
    let name = kit.adapter.info.name.clone();
    let entries: Vec<_> = Catalog::builtin().models.into_iter().filter(|m| m.adapter == name).collect();
    if entries.is_empty() {
        return Ok("no entries in the built-in catalog; nothing to check".into());
    }
    let hub = Hub::new(&standin_hub::start()?, None)?;
    let reach = Reach::declared(&name, &kit.adapter.info.allowed_hosts);
    // Manifests are planned into a directory that is never created: nothing is downloaded.
    let scratch = std::env::temp_dir().join("edgechat-conformance");
    let mut files = 0;
    for entry in &entries {
        let mut session = kit.session()?;
        session.state_mut()?.net.hub = Ok(hub.clone());
        let source = entry.source.to_wit();
        let started = Instant::now();
        let description = session.describe(&source).with_context(|| format!("{}: describe", entry.id))?;
        kit.usage.call("catalog.describe", started.elapsed());
        if description.display_name.trim().is_empty() || description.context_length == 0 || description.parameters == 0 {
            bail!("{}: the description lacks a name, a context length or a parameter count", entry.id);
        }
        let started = Instant::now();
        let manifest = session.manifest(&source).with_context(|| format!("{}: manifest", entry.id))?;
        kit.usage.call("catalog.manifest", started.elapsed());
        kit.usage.session(&session);
        let planned = crate::download_plan::plan(&name, &manifest, &scratch.join(&entry.id), &hub, &reach).map_err(anyhow::Error::msg).with_context(|| format!("{}: manifest", entry.id))?;
        files += planned.len();
    }
    Ok(format!("{} catalog entries: descriptions and manifests valid ({files} files)", entries.len()))
}

fn message(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

/// The built-in conversations: each must format, contain its messages, and end differently with and
/// without the generation prompt; an empty conversation must be refused (not trap).
fn conversations() -> Vec<(&'static str, Vec<Message>)> {
    vec![
        ("single user turn", vec![message("user", "What is the capital of France?")]),
        ("system prompt", vec![message("system", "You answer in one word."), message("user", "Name a colour.")]),
        ("multi-turn", vec![message("user", "Hi!"), message("assistant", "Hello, how can I help?"), message("user", "Tell me a joke.")]),
    ]
}

fn prompt_case(kit: &mut Kit) -> Result<String> {
    let mut session = kit.session()?;
    let mut checked = 0;
    for (what, messages) in conversations() {
        let on = kit.format(&mut session, &messages, true, None).with_context(|| format!("{what}"))?;
        let off = kit.format(&mut session, &messages, false, None).with_context(|| format!("{what} without generation prompt"))?;
        if let Some(m) = messages.iter().find(|m| !on.text.contains(&m.content)) {
            bail!("{what}: the prompt does not contain the {} message {:?}", m.role, m.content);
        }
        if !(on.text.starts_with(&off.text) && on.text.len() > off.text.len()) {
            bail!("{what}: the generation prompt is not an addition at the end of the prompt");
        }
        if on.stop_sequences.is_empty() || on.stop_sequences.iter().any(String::is_empty) {
            bail!("{what}: no stop sequences, or an empty one");
        }
        let d = &on.defaults;
        let sane = d.temperature.is_finite() && d.temperature >= 0.0 && d.top_p > 0.0 && d.top_p <= 1.0 && (0.0..1.0).contains(&d.min_p) && d.repetition_penalty > 0.0;
        if !sane {
            bail!("{what}: generation defaults out of range ({d:?})");
        }
        checked += 2;
    }
    match kit.format(&mut session, &[], true, None) {
        Err(crate::adapter::AdapterError::Refused(_)) => {}
        Ok(_) => bail!("an empty conversation was formatted instead of refused"),
        Err(e) => bail!("an empty conversation stopped the adapter instead of being refused: {e}"),
    }
    Ok(format!("{checked} formats and 1 refusal as expected"))
}

fn determinism_case(kit: &mut Kit) -> Result<String> {
    let (_, messages) = conversations().pop().expect("conversations exist");
    let mut first = kit.session()?;
    let mut second = kit.session()?;
    let a = kit.format(&mut first, &messages, true, None)?;
    let b = kit.format(&mut first, &messages, true, None)?;
    let c = kit.format(&mut second, &messages, true, None)?;
    if a.text != b.text || a.text != c.text || a.stop_sequences != c.stop_sequences {
        bail!("the same conversation formatted differently across calls or instances");
    }
    Ok("the same call gives the same prompt, in one instance and across instances".into())
}

/// `--templates`: a JSON list of `{name, messages, add_generation_prompt, tokenizer_config?, expected |
/// expected_error}`, compared byte for byte.
fn templates_case(kit: &mut Kit, goldens: &Path) -> Result<String> {
    let text = crate::paths::read_capped(goldens, crate::paths::MAX_JSON_BYTES)?;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON list", goldens.display()))?;
    let mut session = kit.session()?;
    for case in &cases {
        let name = case["name"].as_str().unwrap_or("?");
        let messages = crate::chat::read_messages(&case["messages"].to_string()).with_context(|| format!("golden {name}"))?;
        let generation_prompt = case["add_generation_prompt"].as_bool().unwrap_or(true);
        let config = case["tokenizer_config"].as_str().map(str::to_owned);
        let result = kit.format(&mut session, &messages, generation_prompt, config);
        match (result, case["expected"].as_str(), case["expected_error"].as_str()) {
            (Ok(got), Some(expected), _) if got.text == expected => {}
            (Ok(got), Some(expected), _) => {
                let at = got.text.bytes().zip(expected.bytes()).position(|(a, b)| a != b).unwrap_or(got.text.len().min(expected.len()));
                bail!("golden {name}: differs from byte {at} (got {:?}, expected {:?})", snippet(&got.text, at), snippet(expected, at));
            }
            (Err(crate::adapter::AdapterError::Refused(got)), None, Some(expected)) if got == expected => {}
            (other, _, Some(expected)) => bail!("golden {name}: expected the error {expected:?}, got {:?}", other.map(|f| f.text)),
            (Err(e), _, _) => bail!("golden {name}: {e}"),
            (Ok(_), None, None) => bail!("golden {name}: has neither `expected` nor `expected_error`"),
        }
    }
    Ok(format!("{} goldens byte-exact", cases.len()))
}

fn snippet(text: &str, at: usize) -> String {
    let start = at.saturating_sub(10);
    String::from_utf8_lossy(&text.as_bytes()[start.min(text.len())..(at + 30).min(text.len())]).into_owned()
}

fn limits(kit: &mut Kit) -> Result<String> {
    let limits = crate::host::Limits::default();
    let usage = &kit.usage;
    let slowest = match &usage.slowest {
        Some((call, took)) => format!("slowest call {call} {:.1} ms (limit {:.0} s)", took.as_secs_f64() * 1e3, limits.deadlines.for_call(call).as_secs_f64()),
        None => "no timed calls".into(),
    };
    Ok(format!(
        "{slowest}; linear memory peak {:.1} MiB (limit {} MiB); tensor memory peak {:.1} MiB (limit {} MiB)",
        usage.peak_memory as f64 / 1048576.0,
        limits.memory_bytes >> 20,
        usage.peak_tensor_bytes as f64 / 1048576.0,
        limits.max_tensor_bytes >> 20
    ))
}
