//! The sandbox: hostile adapters are stopped quickly with clear errors and the shell keeps working;
//! components that reach for anything but our interfaces are refused before they run.

mod common;

use edgechat::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Message};
use edgechat::adapter::{AdapterError, Session};
use edgechat::registry::Registry;
use edgechat::host::{Deadlines, Limits};
use std::time::Duration;

fn attack(session: &mut Session, attack: &str) -> (Result<String, AdapterError>, ()) {
    let messages = [Message { role: "user".into(), content: attack.into() }];
    let options = FormatOptions { add_generation_prompt: false, tokenizer_config: None };
    (session.format(&messages, &options).map(|f| f.text), ())
}

/// Limits with short deadlines, so a deadline test ends quickly; which limit fires is what is asserted.
fn short_deadlines() -> Limits {
    let quick = Duration::from_millis(1500);
    Limits { deadlines: Deadlines { quick, catalog: quick, compute: quick }, ..Limits::default() }
}

fn assert_stopped(attack_name: &str, expected: &str) {
    assert_stopped_with(Limits::default(), attack_name, expected)
}

fn assert_stopped_with(limits: Limits, attack_name: &str, expected: &str) {
    let adapter = common::host_with(limits).load(&common::component("hostile")).unwrap();
    let mut session = adapter.instantiate().unwrap();
    let (result, _) = attack(&mut session, attack_name);
    let err = result.expect_err("the attack must not succeed");
    let message = err.to_string();
    assert!(matches!(err, AdapterError::Trapped { .. }), "{attack_name}: {message}");
    assert!(message.contains("adapter `hostile`"), "error must name the adapter: {message}");
    assert!(message.contains(expected), "{attack_name}: the limit that fired is named: {message}");
    // The same session recovers with a fresh instance...
    let (again, _) = attack(&mut session, "still alive?");
    assert_eq!(again.unwrap(), "still alive?");
    // ...and other adapters in the process are unaffected.
    let mut gemma = common::load("gemma").instantiate().unwrap();
    let ok = gemma.format(
        &[Message { role: "user".into(), content: "hi".into() }],
        &FormatOptions { add_generation_prompt: true, tokenizer_config: None },
    );
    assert!(ok.is_ok());
}

#[test]
fn an_endless_loop_is_stopped_by_the_compute_budget() {
    assert_stopped("spin", "compute budget");
}

#[test]
fn unbounded_allocation_is_stopped_by_the_memory_cap() {
    assert_stopped("hoard", "memory limit of 256 MiB");
}

#[test]
fn a_million_tensor_handles_are_stopped_by_the_handle_cap() {
    assert_stopped("handles", "live tensor handles");
}

#[test]
fn a_panic_is_reported_as_a_trap() {
    assert_stopped("panic", "trapped");
}

#[test]
fn an_endless_loop_over_a_host_call_is_stopped_by_the_deadline() {
    // Fuel counts guest instructions only: these loops spend their time in the host.
    assert_stopped_with(short_deadlines(), "eval-loop", "time limit of 1.5 s for prompt.format");
    assert_stopped_with(short_deadlines(), "net-loop", "time limit of 1.5 s for prompt.format");
}

#[test]
fn a_guest_loop_is_stopped_by_the_deadline_before_the_fuel_runs_out() {
    let limits = Limits { fuel_per_call: u64::MAX, ..short_deadlines() };
    assert_stopped_with(limits, "spin", "time limit");
}

#[test]
fn a_huge_broadcast_is_charged_before_it_is_recorded() {
    assert_stopped("broadcast", "tensor memory limit");
}

#[test]
fn gathers_outside_a_tensor_are_refused() {
    let mut session = common::load("hostile").instantiate().unwrap();
    let text = attack(&mut session, "gather").0.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    for line in lines {
        assert!(line.starts_with("refused: take: index"), "{line}");
    }
}

#[test]
fn absurd_shapes_are_refused_by_every_op() {
    let mut session = common::load("hostile").instantiate().unwrap();
    let text = attack(&mut session, "shapes").0.unwrap();
    let accepted: Vec<&str> = text.lines().filter(|l| !l.starts_with("refused")).collect();
    assert!(accepted.is_empty(), "accepted: {accepted:#?}");
    assert!(text.lines().count() >= 25, "{text}");
    // The adapter is still usable after all of that.
    assert_eq!(attack(&mut session, "still alive?").0.unwrap(), "still alive?");
}

#[test]
fn a_panic_in_the_shell_during_a_call_is_contained() {
    let mut session = common::load("hostile").instantiate().unwrap();
    let err = session.call::<()>("prompt.format", |_, _| panic!("a host bug")).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, AdapterError::Trapped { .. }), "{message}");
    assert!(message.contains("adapter `hostile`") && message.contains("a host bug"), "{message}");
    assert_eq!(attack(&mut session, "still alive?").0.unwrap(), "still alive?");
}

#[test]
fn an_adapter_cannot_reach_hosts_it_did_not_declare() {
    let mut session = common::load("hostile").instantiate().unwrap();
    let (result, _) = attack(&mut session, "phone-home");
    let text = result.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("host 127.0.0.1 is not among the hosts this adapter declared"), "{text}");
    assert!(lines[1].contains("is not among the hosts this adapter declared"), "{text}");
}

fn refusal(wat: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suspect.wasm");
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    let err = common::host_with(Default::default()).load(&path).err().expect("the component must be refused");
    format!("{err:#}")
}

#[test]
fn a_component_importing_wasi_is_refused() {
    let message = refusal(
        r#"(component
             (import "wasi:cli/environment@0.2.0" (instance (export "get-arguments" (func (result (list string))))))
           )"#,
    );
    assert!(message.contains("imports `wasi:cli/environment@0.2.0`"), "{message}");
    assert!(message.contains("no WASI"), "{message}");
}

#[test]
fn an_unknown_contract_version_is_refused() {
    let message = refusal(
        r#"(component
             (instance $empty)
             (export "edgechat:adapter/info@9.0.0" (instance $empty))
           )"#,
    );
    assert!(message.contains("contract 9.0.0; this edgechat supports 0.1.0"), "{message}");
}

#[test]
fn an_incomplete_adapter_is_refused() {
    let message = refusal(
        r#"(component
             (instance $empty)
             (export "edgechat:adapter/info@0.1.0" (instance $empty))
           )"#,
    );
    assert!(message.contains("does not export edgechat:adapter/catalog@0.1.0"), "{message}");
}

#[test]
fn garbage_and_core_modules_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = common::host_with(Default::default());
    for (name, bytes) in [("garbage.wasm", b"not wasm at all".to_vec()), ("core.wasm", wat::parse_str("(module)").unwrap())] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = host.load(&path).err().expect("must be refused");
        assert!(format!("{err:#}").contains("is not a valid WebAssembly component"), "{err:#}");
    }
}

#[test]
fn a_directory_with_a_bad_adapter_still_loads_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::component("leap"), dir.path().join("leap.wasm")).unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"\0asm garbage").unwrap();
    let registry = Registry::from_dirs(&common::host_with(Default::default()), &[dir.path().to_owned()]);
    assert_eq!(registry.adapters.len(), 1);
    assert_eq!(registry.adapters[0].name(), "leap");
    let refused: Vec<_> = registry.refused().collect();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].0.ends_with("broken.wasm"));
}

#[test]
fn compiled_code_is_cached_by_content_hash() {
    use edgechat::adapter::CodeSource;
    let cache = tempfile::tempdir().unwrap();
    let host = edgechat::adapter::AdapterHost::new(Default::default(), Some(cache.path().to_owned())).unwrap();
    let first = host.load(&common::component("leap")).unwrap();
    let second = host.load(&common::component("leap")).unwrap();
    assert!(matches!(first.code, CodeSource::Compiled(_)));
    assert!(matches!(second.code, CodeSource::Cached(_)));
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    // A corrupted cache entry is recompiled, not trusted.
    let entry = std::fs::read_dir(cache.path()).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&entry, b"corrupt").unwrap();
    let third = host.load(&common::component("leap")).unwrap();
    assert!(matches!(third.code, CodeSource::Compiled(_)));
    assert_eq!(third.info.name, "leap");
}
