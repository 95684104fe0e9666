//! `edgechat adapters ...`: keys, packages, installs, the signed index, and the conformance kit.

use crate::shell::Shell;
use crate::adapter::{AdapterHost, CodeSource};
use crate::conformance::{self, Fixture};
use crate::db::Db;
use crate::registry::State;
use crate::updates::signing::{self, PublicKey, SecretKey};
use crate::updates::{describe_origin, index, package, Installed, Store};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// Every adapter found: name, version, contract, origin, and whether it runs (or why not).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make an ed25519 key pair: the secret in KEYFILE (mode 0600), the public key in KEYFILE.pub.
    Keygen { keyfile: PathBuf },
    /// Sign a component into a package; what it records is read from the component itself.
    Pack {
        component: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Trust a publisher's public key (a KEYFILE.pub).
    Trust { pubfile: PathBuf },
    /// Stop trusting a key; what it signed is refused from then on.
    Untrust { key_id: String },
    /// The publisher keys this installation trusts.
    Keys,
    /// Verify a package (a file or an http(s) URL), test it, and make it the active version.
    Install { package: String },
    /// Go back to the previously active version.
    Rollback { name: String },
    /// Go back to the built-in adapter, deleting the installed packages.
    Remove { name: String },
    /// The publisher's side of updates.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Fetch the signed index and install what is newer.
    Update {
        /// The index URL (default: $EDGECHAT_ADAPTER_INDEX, else the last one used).
        #[arg(long)]
        index: Option<String>,
        /// Only say what would be installed.
        #[arg(long)]
        check: bool,
    },
    /// Run the conformance kit on a component, with no installed state.
    Test {
        component: PathBuf,
        /// A model directory to check against a reference (give --reference after it); repeatable.
        #[arg(long)]
        fixture: Vec<PathBuf>,
        /// The transformers reference for the preceding --fixture.
        #[arg(long)]
        reference: Vec<PathBuf>,
        /// Chat template goldens: [{name, messages, add_generation_prompt, expected | expected_error}].
        #[arg(long)]
        templates: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Sign DIR/index.json over the .ecpkg packages in DIR, one version above the one there.
    Build {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// How long the index is valid: 30d, 12h, 1s, ...
        #[arg(long, default_value = "30d", value_parser = index::parse_duration)]
        expires: std::time::Duration,
    },
}

pub fn run(command: AdaptersCommand) -> Result<()> {
    match command {
        AdaptersCommand::List { json } => list(json),
        AdaptersCommand::Keygen { keyfile } => {
            let public = signing::keygen(&keyfile)?;
            println!("key {} : secret in {}, public key in {}", public.id(), keyfile.display(), signing::public_path(&keyfile).display());
            Ok(())
        }
        AdaptersCommand::Pack { component, key, out } => pack(&component, &key, &out),
        AdaptersCommand::Trust { pubfile } => {
            let text = crate::paths::read_capped(&pubfile, 4096)?;
            let key = PublicKey::parse(&text).with_context(|| format!("{}", pubfile.display()))?;
            let added = open_db()?.trust_key(&key.id(), &key.hex())?;
            println!("{} key {}", if added { "trusted" } else { "already trusted:" }, key.id());
            Ok(())
        }
        AdaptersCommand::Untrust { key_id } => {
            if !open_db()?.untrust_key(&key_id)? {
                bail!("no trusted key {} (see `edgechat adapters keys`)", crate::text::printable(&key_id, 40));
            }
            println!("untrusted key {key_id}; adapters it signed are refused from now on");
            Ok(())
        }
        AdaptersCommand::Keys => {
            let keys = open_db()?.trusted_keys()?;
            if keys.is_empty() {
                println!("no trusted publisher keys (add one with `edgechat adapters trust KEYFILE.pub`)");
            }
            for (id, hex, added) in keys {
                let when = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(added.max(0) as u64));
                println!("{id}  edgechat-ed25519 {hex}  trusted {when}");
            }
            Ok(())
        }
        AdaptersCommand::Install { package } => install(&package),
        AdaptersCommand::Rollback { name } => {
            let shell = Shell::open()?;
            let back_to = Store::new(&shell.paths, &shell.db).rollback(&shell.host, &name)?;
            println!("{name}: rolled back to {back_to}");
            Ok(())
        }
        AdaptersCommand::Remove { name } => {
            let shell = Shell::open()?;
            Store::new(&shell.paths, &shell.db).remove(&name)?;
            println!("{name}: removed; the built-in adapter (if any) runs again");
            Ok(())
        }
        AdaptersCommand::Index { command: IndexCommand::Build { dir, key, expires } } => {
            let key = SecretKey::read(&key)?;
            let trusted = Store::new(&crate::paths::Paths::resolve()?, &open_db()?).trusted_keys()?;
            let built = index::build(&dir, &key, expires, &trusted)?;
            println!("{} version {} ({} packages, signed by {}, expires {})", dir.join(index::FILE_NAME).display(), built.version, built.adapters.len(), key.public().id(), built.expires);
            Ok(())
        }
        AdaptersCommand::Update { index, check } => update(index.as_deref(), check),
        AdaptersCommand::Test { component, fixture, reference, templates, json } => test(&component, fixture, reference, templates.as_deref(), json),
    }
}

fn open_db() -> Result<Db> {
    Db::open(&crate::paths::Paths::resolve()?.database())
}

fn list(json: bool) -> Result<()> {
    let shell = Shell::open()?;
    if shell.registry.listed.is_empty() {
        bail!("no adapters found (looked in {} and the build's target/adapters): run `cargo xtask adapters`", shell.paths.user_adapters().display());
    }
    if json {
        for l in &shell.registry.listed {
            let code = shell.registry.adapters.iter().find(|a| a.path == l.path).map(|a| code_label(a.code));
            println!("{}", serde_json::json!({
                "name": l.name, "version": l.version, "contract": l.contract, "origin": l.origin, "sha256": l.sha256,
                "path": l.path, "state": l.state, "code": code,
            }));
        }
        return Ok(());
    }
    println!("{:<8} {:<8} {:<9} {:<10} {:<38} {:<16} {:<9} FROM", "NAME", "VERSION", "CONTRACT", "FAMILIES", "ORIGIN", "SHA256", "STATE");
    for l in &shell.registry.listed {
        let state = match &l.state {
            State::Active => "active",
            State::Shadowed => "shadowed",
            State::Kept => "kept",
            State::Refused(_) => "refused",
        };
        let origin = if l.state == State::Kept { "installed, kept for rollback".to_owned() } else { describe_origin(&l.origin) };
        println!(
            "{:<8} {:<8} {:<9} {:<10} {:<38} {:<16} {state:<9} {}",
            l.name,
            l.version.as_deref().unwrap_or("-"),
            l.contract.as_deref().unwrap_or("-"),
            if l.families.is_empty() { "-".to_owned() } else { l.families.join(",") },
            origin,
            l.sha256.as_deref().map_or("-", |s| &s[..16]),
            l.path.display()
        );
    }
    for (path, reason) in shell.registry.refused() {
        println!("refused  {}: {reason}", path.display());
    }
    Ok(())
}

fn code_label(code: CodeSource) -> String {
    match code {
        CodeSource::Compiled(d) => format!("compiled {:.0}ms", d.as_secs_f64() * 1e3),
        CodeSource::Cached(d) => format!("cached {:.1}ms", d.as_secs_f64() * 1e3),
    }
}

fn pack(component: &Path, key: &Path, out: &Path) -> Result<()> {
    let key = SecretKey::read(key)?;
    let bytes = std::fs::read(component).with_context(|| format!("reading {}", component.display()))?;
    if bytes.len() as u64 > package::MAX_COMPONENT_BYTES {
        bail!("{} is larger than {} MiB", component.display(), package::MAX_COMPONENT_BYTES >> 20);
    }
    let host = AdapterHost::new(crate::host::Limits::default(), None)?;
    let adapter = host.load_bytes(&bytes, component, crate::adapter::Origin::Development)?;
    crate::updates::parse_version(&adapter.info.version, "the component's")?;
    let manifest = package::PackageManifest::describe(&adapter.info, &bytes);
    let packed = package::Package::build(bytes, &manifest, &key)?;
    std::fs::write(out, packed).with_context(|| format!("writing {}", out.display()))?;
    println!("{} {} (contract {}) signed by {} -> {}", manifest.adapter.name, manifest.adapter.version, manifest.adapter.contract_version, key.public().id(), out.display());
    Ok(())
}

fn install(source: &str) -> Result<()> {
    let shown = crate::text::printable(source, 200);
    let bytes = crate::updates::read_source(source).with_context(|| format!("cannot install {shown}"))?;
    let shell = Shell::open()?;
    let store = Store::new(&shell.paths, &shell.db);
    match store.install(&shell.host, &shell.registry.current(), &bytes).with_context(|| format!("refusing to install {shown}"))? {
        Installed::Switched { name, version, signer, previous } => println!("{name} {version} installed and active (signed by {signer}); previous: {previous}"),
        Installed::AlreadyActive { name, version } => println!("{name} {version} is already active; nothing to do"),
    }
    Ok(())
}

fn update(index_flag: Option<&str>, check: bool) -> Result<()> {
    let shell = Shell::open()?;
    let url = index::index_url(index_flag, &shell.db)?;
    let store = Store::new(&shell.paths, &shell.db);
    let report = index::update(&shell.host, &shell.registry.current(), &store, &shell.db, &url, check)?;
    println!("index version {} (signed by {}, expires {})", report.version, report.signer, report.expires);
    for line in report.lines {
        println!("  {line}");
    }
    Ok(())
}

fn test(component: &Path, models: Vec<PathBuf>, references: Vec<PathBuf>, templates: Option<&Path>, json: bool) -> Result<()> {
    if models.len() != references.len() {
        bail!("give one --reference for each --fixture ({} fixtures, {} references)", models.len(), references.len());
    }
    let fixtures: Vec<Fixture> = models.into_iter().zip(references).map(|(model, reference)| Fixture { model, reference }).collect();
    let report = conformance::test_component(component, &fixtures, templates)?;
    if json {
        println!("{}", serde_json::json!({ "adapter": report.adapter, "version": report.version, "contract": report.contract, "passed": report.passed(), "cases": report.cases }));
    } else {
        println!("{} {} (contract {})", report.adapter, report.version, report.contract);
        println!("{:<24} {:<6} {:>9}  DETAIL", "CASE", "RESULT", "TIME");
        for case in &report.cases {
            println!("{:<24} {:<6} {:>7.1}ms  {}", case.name, if case.passed { "pass" } else { "FAIL" }, case.millis, case.detail);
        }
    }
    if !report.passed() {
        bail!("adapter {} failed the conformance kit: {}", report.adapter, report.failures());
    }
    Ok(())
}
