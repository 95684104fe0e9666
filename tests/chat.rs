//! The chat library (`ChatSession`) on the tiny Gemma 3 fixture with a byte-level tokenizer
//! (tests/fixtures/tiny/make_tokenizer.py): cache reuse changes no token, cancel keeps what streamed, a
//! conversation longer than the context drops its oldest turns, and conversations persist.

mod common;

use edgechat::chat::{ChatSession, Event, LoadedModel, Message};
use edgechat::db::Db;
use edgechat::generate::StopReason;
use edgechat::models::ModelFiles;
use edgechat::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};

/// The tiny model as a model directory with a tokenizer (1024 tokens of context).
fn tiny() -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture(&format!("tiny/tiny-gemma3/{file}")), dir.path().join(file)).unwrap();
    }
    std::fs::copy(common::fixture("tiny/tokenizer/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let registry = Registry::from_dirs(&common::host_with(Default::default()), &[common::workspace().join("target/adapters")]);
    let files = ModelFiles::inspect(dir.path()).unwrap();
    let model = LoadedModel::from_files(&registry, "tiny-gemma3", &files, None).unwrap();
    assert_eq!(model.context_length, 1024);
    (dir, model)
}

fn greedy(session: &mut ChatSession, max_tokens: usize) {
    session.settings.set("temperature", "0").unwrap();
    session.settings.set("max_tokens", &max_tokens.to_string()).unwrap();
}

fn say(session: &mut ChatSession, text: &str) -> (String, edgechat::chat::TurnStats) {
    let mut streamed = String::new();
    let stats = session
        .send(text, &AtomicBool::new(false), |e| {
            if let Event::Text(t) = e {
                streamed.push_str(t)
            }
        })
        .unwrap();
    assert_eq!(&streamed, &session.turns.last().unwrap().content, "what streamed is what was kept");
    (streamed, stats)
}

#[test]
fn a_second_turn_reuses_the_cache_and_gives_the_tokens_of_a_fresh_run() {
    let (_dir, model) = tiny();
    let mut session = ChatSession::new(model, Some("Be brief.".into()));
    greedy(&mut session, 12);
    let (_, first) = say(&mut session, "Hello there");
    assert_eq!(first.cached_tokens, 0);
    let (second_reply, second) = say(&mut session, "And then?");
    // Everything up to the first reply's last token is reused: the prompt grows by the new turn only.
    assert!(second.cached_tokens >= first.prompt_tokens, "{} cached of {}", second.cached_tokens, second.prompt_tokens);

    let (_dir2, mut fresh) = tiny();
    let prepared = fresh.format(&session.messages()[..session.messages().len() - 1], true).unwrap();
    let sampling = session.settings.sampling(&prepared.defaults);
    let outcome = fresh.generate(&prepared.ids, &prepared.stops, sampling, 12, &AtomicBool::new(false), |_, _| {}).unwrap();
    assert_eq!(outcome.prompt_tokens - outcome.prefilled_tokens, 0, "a fresh model computes everything");
    assert_eq!(outcome.text, second_reply);
}

#[test]
fn cancel_stops_the_reply_within_a_token_and_keeps_what_streamed() {
    let (_dir, model) = tiny();
    let mut session = ChatSession::new(model, None);
    greedy(&mut session, 200);
    let cancel = AtomicBool::new(false);
    let (mut streamed, mut after_cancel) = (String::new(), 0);
    let stats = session
        .send("Tell me everything", &cancel, |e| {
            if let Event::Text(text) = e {
                if cancel.load(Ordering::SeqCst) {
                    after_cancel += 1;
                }
                streamed.push_str(text);
                if streamed.len() >= 10 {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    assert_eq!(stats.stop, StopReason::Cancelled);
    assert_eq!(after_cancel, 0, "no token after the cancel");
    assert!(stats.completion_tokens < 200);
    assert_eq!(session.turns.len(), 2);
    assert_eq!(session.turns[1].content, streamed, "what was generated stays");
}

#[test]
fn a_conversation_longer_than_the_context_drops_its_oldest_turns_keeping_the_system_prompt() {
    let (_dir, model) = tiny();
    let mut session = ChatSession::new(model, Some("You are a test.".into()));
    greedy(&mut session, 8);
    let long = "x".repeat(300); // 300 tokens with the byte-level tokenizer
    let mut dropped = 0;
    for _ in 0..4 {
        session
            .send(&long, &AtomicBool::new(false), |e| {
                if let Event::Dropped { turns } = e {
                    dropped += turns;
                }
            })
            .unwrap();
    }
    assert!(dropped >= 2, "older turns were dropped ({dropped})");
    assert_eq!(session.window_start, dropped);
    assert_eq!(session.turns.len(), 8, "the kept conversation is whole; only the model's window moved");
    let seen = session.messages();
    assert_eq!((seen[0].role.as_str(), seen[0].content.as_str()), ("system", "You are a test."));
    assert_eq!(seen[1].role, "user", "the window starts at a user turn");
    let last = session.last.clone().unwrap();
    assert!(last.prompt_tokens + last.completion_tokens <= 1024, "the last reply fit the context");

    let err = session.send(&"y".repeat(2000), &AtomicBool::new(false), |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("does not fit"), "{err:#}");
    assert_eq!(session.turns.len(), 8, "a refused message leaves the conversation as it was");
}

#[test]
fn conversations_are_saved_turn_by_turn_and_resume_where_they_were() {
    let (_dir, model) = tiny();
    let home = tempfile::tempdir().unwrap();
    let db = Db::open(&home.path().join("edgechat.db")).unwrap();
    let mut session = ChatSession::new(model, Some("Be brief.".into()));
    greedy(&mut session, 6);
    say(&mut session, "One");
    let id = session.save(&db, None).unwrap();
    say(&mut session, "Two");
    session.save(&db, None).unwrap();
    let old_reply = session.turns[3].content.clone();
    session.settings.set("temperature", "1.5").unwrap();
    session.settings.set("seed", "7").unwrap();
    session.regenerate(&AtomicBool::new(false), |_| {}).unwrap();
    session.save(&db, Some("Counting")).unwrap();

    let (record, messages) = db.conversation(id).unwrap().unwrap();
    assert_eq!((record.title.as_str(), record.model.as_str(), record.adapter.as_str()), ("Counting", "tiny-gemma3", "gemma"));
    assert_eq!(messages.len(), 4, "the regenerated reply replaced the saved one");
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[3].content, session.turns[3].content);
    assert_ne!(messages[3].content, old_reply, "a seeded sample at temperature 1.5 differs from the greedy reply");

    let (_dir2, model) = tiny();
    let resumed = ChatSession::resume(model, &db, id).unwrap();
    assert_eq!(resumed.turns, session.turns);
    assert_eq!(resumed.system.as_deref(), Some("Be brief."));
    assert_eq!(resumed.settings, session.settings);
    let exported: Vec<Message> = resumed.messages();
    assert_eq!(exported.len(), 5);
}
