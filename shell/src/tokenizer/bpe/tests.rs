//! The flat BPE against `tokenizers`' own, under every option.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::{Model, Trainer};

/// A BPE trained by `tokenizers` on real text, as a tokenizer.json model section: words are
/// `▁`-prefixed as Gemma's are, `prefix` and `suffix` mark subwords as WordPiece-style models do.
fn trained(prefix: Option<&str>, suffix: Option<&str>) -> Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/text/harbor.txt")).unwrap();
    let mut trainer = BpeTrainer::builder().vocab_size(600).show_progress(false);
    if let Some(p) = prefix {
        trainer = trainer.continuing_subword_prefix(p.into());
    }
    if let Some(s) = suffix {
        trainer = trainer.end_of_word_suffix(s.into());
    }
    let mut trainer = trainer.build();
    trainer.feed(text.lines(), |line| Ok(line.split(' ').map(|w| format!("▁{w}")).collect())).unwrap();
    let mut model = BPE::default();
    model.continuing_subword_prefix = prefix.map(Into::into);
    model.end_of_word_suffix = suffix.map(Into::into);
    trainer.train(&mut model).unwrap();
    serde_json::to_value(&model).unwrap()
}

/// `section` with `<unk>` and the byte tokens up to `last_byte` added to its vocabulary.
fn with_unknown_and_bytes(section: Value) -> Value {
    with_unknown_and_bytes_to(section, 255)
}

fn with_unknown_and_bytes_to(mut section: Value, last_byte: u8) -> Value {
    let vocab = section["vocab"].as_object_mut().unwrap();
    for token in std::iter::once("<unk>".to_string()).chain((0..=last_byte).map(|b| format!("<{b:#04X}>"))) {
        let id = vocab.len();
        vocab.insert(token, json!(id));
    }
    section
}

/// Model sections covering each option: byte fallback, unknown characters fused or not, whole
/// words kept, subword prefix and word suffix, merges in the older one-string form, a pair listed
/// twice (its last rank counts), byte fallback that fails for some characters (no tokens for
/// bytes past 0x7F: those characters are unknown, and one still pending follows the bytes of the
/// next character, as in `tokenizers`).
fn sections() -> Vec<Value> {
    let plain = trained(None, None);
    let full = with_unknown_and_bytes(plain.clone());
    let set = |mut v: Value, changes: Value| {
        for (k, x) in changes.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let mut listed_twice = full.clone();
    let merges = listed_twice["merges"].as_array_mut().unwrap();
    let first = merges[0].clone();
    merges.push(first);
    let mut lines = plain.clone();
    let as_lines: Vec<Value> = lines["merges"].as_array().unwrap().iter().map(|m| json!(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))).collect();
    lines["merges"] = json!(std::iter::once(json!("#version: 0.2")).chain(as_lines).collect::<Vec<_>>());
    vec![
        plain.clone(),
        set(full.clone(), json!({ "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true })),
        set(full.clone(), json!({ "unk_token": "<unk>", "fuse_unk": false })),
        set(full.clone(), json!({ "unk_token": "<unk>", "fuse_unk": true, "ignore_merges": true })),
        set(with_unknown_and_bytes(trained(Some("##"), None)), json!({ "unk_token": "<unk>", "byte_fallback": true })),
        set(with_unknown_and_bytes(trained(None, Some("</w>"))), json!({ "unk_token": "<unk>" })),
        set(listed_twice, json!({ "byte_fallback": true })),
        lines,
        set(with_unknown_and_bytes_to(plain.clone(), 0x7f), json!({ "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true })),
    ]
}

fn ours(section: &Value) -> Bpe {
    Bpe::parse(&section.to_string()).unwrap().expect("held in flat arrays")
}

fn theirs(section: &Value) -> BPE {
    serde_json::from_str(&section.to_string()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// Words of the training text, cut and mixed with characters the vocabulary lacks, tokenize
    /// to the same tokens, values and offsets as `tokenizers` gives them, under every option.
    #[test]
    fn tokenizes_as_tokenizers_does(which in 0..9usize, word in "(▁?(the|harbor|ship|ing|s|e|a|[a-z]|[~^|]|é|中|🙂|\\PC)){0,12}") {
        let sections = SECTIONS.with(|s| s.clone());
        let (a, b) = (ours(&sections[which]), theirs(&sections[which]));
        prop_assert_eq!(a.tokenize(&word).unwrap(), b.tokenize(&word).unwrap(), "section {}", which);
    }
}

thread_local! {
    static SECTIONS: Vec<Value> = sections();
}

#[test]
fn the_options_change_the_tokens() {
    // Each option is exercised: with it, some word tokenizes differently than without it.
    let s = sections();
    let ids = |section: &Value, word: &str| ours(section).tokenize(word).unwrap().iter().map(|t| t.id).collect::<Vec<_>>();
    assert_ne!(ids(&s[1], "▁中中"), ids(&s[2], "▁中中"), "byte fallback");
    let mut unfused = s[2].clone();
    unfused["fuse_unk"] = json!(true);
    assert_ne!(ids(&s[2], "中中"), ids(&unfused, "中中"), "fused unknowns");
    let word = ours(&s[3]).tokenize("▁harbor").unwrap();
    assert_eq!(word.len(), 1, "a whole word in the vocabulary is one token with ignore_merges: {word:?}");
    assert!(ours(&s[4]).tokenize("▁harbors").unwrap().iter().skip(1).all(|t| t.value.starts_with("##")));
    assert!(ours(&s[5]).tokenize("▁harbor").unwrap().last().unwrap().value.ends_with("</w>"));
    assert_eq!(ours(&s[7]).merges.len(), ours(&s[0]).merges.len(), "the #version line is not a merge");
    let (twice, first) = (ours(&s[6]), &s[6]["merges"][0]);
    let id = |t: &Value| twice.id(t.as_str().unwrap().as_bytes()).unwrap();
    let listed = s[6]["merges"].as_array().unwrap().len() as u32;
    assert_eq!(twice.merge(id(&first[0]), id(&first[1])).unwrap(), listed - 1, "a pair listed twice has its last rank");
    let pending = ours(&s[8]).tokenize("中~").unwrap();
    assert_eq!(pending.iter().map(|t| t.value.as_str()).collect::<Vec<_>>(), ["<0x7E>", "<unk>"], "an unknown still pending follows the next bytes");
}

#[test]
fn it_writes_itself_as_tokenizers_does() {
    for section in sections() {
        let (a, b) = (ours(&section), theirs(&section));
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (files_a, files_b) = (a.save(dir_a.path(), Some("m")).unwrap(), b.save(dir_b.path(), Some("m")).unwrap());
        for (fa, fb) in files_a.iter().zip(&files_b) {
            assert_eq!(fa.file_name(), fb.file_name());
            assert_eq!(std::fs::read(fa).unwrap(), std::fs::read(fb).unwrap());
        }
        assert_eq!(a.get_vocab(), b.get_vocab());
        assert_eq!((a.id_to_token(3), a.id_to_token(100_000)), (b.id_to_token(3), b.id_to_token(100_000)));
    }
}

#[test]
fn what_it_does_not_hold_is_left_to_tokenizers() {
    let mut section = sections()[1].clone();
    section["dropout"] = json!(0.5);
    assert!(Bpe::parse(&section.to_string()).unwrap().is_none(), "dropout");
    section["dropout"] = json!(0.0);
    assert!(Bpe::parse(&section.to_string()).unwrap().is_some(), "dropout 0 is no dropout");
    let mut gap = sections()[0].clone();
    let vocab = gap["vocab"].as_object_mut().unwrap();
    vocab.insert("zzz-gap".into(), json!(vocab.len() + 5));
    assert!(Bpe::parse(&gap.to_string()).unwrap().is_none(), "a gap in the ids");
    let repeated = sections()[0].to_string().replacen("\"vocab\":{", "\"vocab\":{\"a\":0,", 1);
    assert!(Bpe::parse(&repeated).unwrap().is_none(), "a text listed twice");
}

#[test]
fn bad_sections_are_refused_with_the_reason() {
    let error = |section: Value| format!("{:#}", Bpe::parse(&section.to_string()).err().expect("refused"));
    let base = sections()[0].clone();
    let with = |key: &str, value: Value| {
        let mut v = base.clone();
        v[key] = value;
        v
    };
    assert!(error(with("merges", json!([["▁t", "not-a-token"]]))).contains("Token `not-a-token` out of vocabulary"));
    assert!(error(with("merges", json!(["a b c"]))).contains("Merges text file invalid at line 1"));
    let first = base["merges"][0].clone();
    let line = format!("{} {}", first[0].as_str().unwrap(), first[1].as_str().unwrap());
    assert!(error(with("merges", json!([first, line]))).contains("merges mix pairs and strings"));
    assert!(error(with("merges", json!([["a", "b", "c"]]))).contains("did not match any variant"));
    assert!(error(with("dropout", json!(2.0))).contains("dropout should be between 0 and 1"));
    assert!(error(with("vocab", json!({ "a": -1 }))).contains("invalid value"));
    let mut no_merges = base.clone();
    no_merges.as_object_mut().unwrap().remove("merges");
    assert!(error(no_merges).contains("Missing vocab/merges"));
    // `tokenizers` slices the prefix off without checking and would panic here.
    let mut short = with("continuing_subword_prefix", json!("####"));
    short["merges"] = json!([["a", "b"]]);
    assert!(error(short).contains("shorter than the subword prefix"));
}
