//! Loading a model's tokenizer.json. `tokenizers::Tokenizer::from_file` reads the model section into
//! serde values twice over before building the model from them: for Gemma 3's (262144 tokens, 514906
//! merges, a 33 MB file) that is ~250 MB of temporaries, and the freed heap stayed resident, so a run
//! held ~390 MiB before reading a weight (peak RSS 2.5x the weights). Here the file's top level is
//! parsed with the model left as borrowed raw JSON, the model is parsed once straight into its own type
//! (each of `tokenizers`' models reads its own `type` field), and the parts are assembled as
//! `tokenizers`' own deserializer assembles them. A BPE model, the kind both our model families use, is
//! held in flat arrays (`bpe.rs`): `tokenizers`' own keeps 68 MB for Gemma 3's.

mod bpe;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::{bpe::BPE, unigram::Unigram, wordlevel::WordLevel, wordpiece::WordPiece, ModelWrapper, TrainerWrapper};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper, PreTokenizerWrapper, Token, TokenizerBuilder,
    TokenizerImpl, TruncationParams,
};

/// `tokenizers`' pipeline around our model.
pub type Tokenizer = TokenizerImpl<Model, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// Largest tokenizer.json accepted (the largest real ones are a few tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The tokenizer in `path`.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let text = crate::paths::read_capped(path, MAX_TOKENIZER_BYTES)?;
    let tokenizer = parse(&text).with_context(|| format!("cannot read tokenizer {}", path.display()));
    drop(text);
    // Hand the parse's freed memory back to the system: it is scattered between the tokenizer's own
    // allocations, where the allocator would otherwise keep it resident for the whole run.
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
    tokenizer
}

/// The top level of a tokenizer.json, the model left unparsed.
#[derive(Deserialize)]
struct Parts<'a> {
    version: Option<String>,
    #[serde(borrow)]
    model: &'a RawValue,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenWithId>,
}

#[derive(Deserialize)]
struct AddedTokenWithId {
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

/// A tokenizer from the text of a tokenizer.json.
pub fn parse(json: &str) -> Result<Tokenizer> {
    let parts: Parts = serde_json::from_str(json)?;
    if let Some(version) = parts.version.as_deref().filter(|&v| v != "1.0") {
        bail!("unknown tokenizer version '{version}'");
    }
    let model = model(parts.model.get())?;
    let mut tokenizer: Tokenizer = TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(parts.normalizer)
        .with_pre_tokenizer(parts.pre_tokenizer)
        .with_post_processor(parts.post_processor)
        .with_decoder(parts.decoder)
        .with_truncation(parts.truncation)
        .with_padding(parts.padding)
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // As `tokenizers` does: a listed id that the vocabulary contradicts is warned about, not refused.
    for t in &parts.added_tokens {
        if let Some(id) = tokenizer.token_to_id(&t.token.content).filter(|&id| id != t.id) {
            tracing::warn!("added token {:?} is listed with id {} but the vocabulary gives it {id}", t.token.content, t.id);
        }
    }
    tokenizer.add_tokens(parts.added_tokens.into_iter().map(|t| t.token)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tokenizer)
}

/// The model, parsed once into the type its `type` field names (a file without one, from before
/// `tokenizers` wrote it, goes through `tokenizers`' own guessing).
fn model(json: &str) -> Result<Model> {
    #[derive(Deserialize)]
    struct ModelSection<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    let kind: ModelSection = serde_json::from_str(json)?;
    if kind.kind == Some("BPE") {
        if let Some(bpe) = bpe::Bpe::parse(json)? {
            return Ok(Model::Bpe(bpe));
        }
    }
    Ok(Model::Other(match kind.kind {
        Some("BPE") => ModelWrapper::BPE(serde_json::from_str::<BPE>(json)?),
        Some("Unigram") => ModelWrapper::Unigram(serde_json::from_str::<Unigram>(json)?),
        Some("WordPiece") => ModelWrapper::WordPiece(serde_json::from_str::<WordPiece>(json)?),
        Some("WordLevel") => ModelWrapper::WordLevel(serde_json::from_str::<WordLevel>(json)?),
        Some(other) => bail!("unknown tokenizer model type '{other}'"),
        None => serde_json::from_str::<ModelWrapper>(json)?,
    }))
}

/// A tokenizer's model: a BPE in flat arrays, or any model as `tokenizers` holds it (what the flat
/// BPE does not hold: dropout, a vocabulary with gaps or repeats).
#[derive(Clone, Debug)]
pub enum Model {
    Bpe(bpe::Bpe),
    Other(ModelWrapper),
}

macro_rules! each_model {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            Model::Bpe($m) => $body,
            Model::Other($m) => $body,
        }
    };
}

impl tokenizers::Model for Model {
    type Trainer = TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        each_model!(self, m => m.tokenize(sequence))
    }
    fn token_to_id(&self, token: &str) -> Option<u32> {
        each_model!(self, m => m.token_to_id(token))
    }
    fn id_to_token(&self, id: u32) -> Option<String> {
        each_model!(self, m => m.id_to_token(id))
    }
    fn get_vocab(&self) -> HashMap<String, u32> {
        each_model!(self, m => m.get_vocab())
    }
    fn get_vocab_size(&self) -> usize {
        each_model!(self, m => m.get_vocab_size())
    }
    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        each_model!(self, m => m.save(folder, prefix))
    }
    fn get_trainer(&self) -> TrainerWrapper {
        each_model!(self, m => m.get_trainer().into())
    }
}

impl serde::Serialize for Model {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        each_model!(self, m => m.serialize(serializer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tokenizer as `tokenizers` itself loads it, and as we do: the same when written back out, and
    /// the same tokens for text that exercises added tokens, bytes and the post-processor.
    fn assert_loads_as_tokenizers_does(json: &str) {
        let theirs = tokenizers::Tokenizer::from_bytes(json.as_bytes()).expect("tokenizers loads it");
        let ours = parse(json).expect("we load it");
        assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap());
        for text in ["Hello world, <|im_start|>user\nhi<|im_end|> 123 ünïcödé 🙂", "", "  spaced  out  "] {
            let (a, b) = (ours.encode(text, true).unwrap(), theirs.encode(text, true).unwrap());
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
            assert_eq!(ours.decode(a.get_ids(), false).unwrap(), theirs.decode(b.get_ids(), false).unwrap());
        }
    }

    fn fixture() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tokenizer/tokenizer.json");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_bpe_tokenizer_with_added_tokens_loads_as_tokenizers_loads_it() {
        let json = fixture();
        let file: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(file["model"]["type"], "BPE");
        assert!(!file["added_tokens"].as_array().unwrap().is_empty());
        assert_loads_as_tokenizers_does(&json);
    }

    #[test]
    fn every_model_type_loads_as_tokenizers_loads_it() {
        use serde_json::json;
        let words = ["[UNK]", "hello", "world", "hel", "##lo", "h", "e", "l", "o", "w", "r", "d"];
        let vocab: serde_json::Map<_, _> = words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
        let scored: Vec<_> = words.iter().map(|w| json!([w, -1.0 - w.len() as f64])).collect();
        let models = [
            json!({ "type": "Unigram", "unk_id": 0, "vocab": scored, "byte_fallback": false }),
            json!({ "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab }),
            json!({ "type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab }),
        ];
        for model in models {
            let mut tokenizer = tokenizers::Tokenizer::new(serde_json::from_value::<ModelWrapper>(model.clone()).unwrap());
            assert_eq!(serde_json::to_value(tokenizer.get_model()).unwrap()["type"], model["type"]);
            tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
            tokenizer.add_special_tokens([AddedToken::from("<|im_start|>", true), AddedToken::from("<|im_end|>", true)]).unwrap();
            assert_loads_as_tokenizers_does(&tokenizer.to_string(false).unwrap());
        }
    }

    #[test]
    fn a_file_from_before_models_named_their_type_still_loads() {
        let mut file: serde_json::Value = serde_json::from_str(&fixture()).unwrap();
        file["model"].as_object_mut().unwrap().remove("type");
        assert_loads_as_tokenizers_does(&file.to_string());
    }

    #[test]
    fn unknown_versions_and_model_types_are_refused() {
        let mut file: serde_json::Value = serde_json::from_str(&fixture()).unwrap();
        file["version"] = "2.0".into();
        assert!(parse(&file.to_string()).unwrap_err().to_string().contains("unknown tokenizer version '2.0'"));
        file["version"] = "1.0".into();
        file["model"]["type"] = "Sentencepiece".into();
        assert!(parse(&file.to_string()).unwrap_err().to_string().contains("unknown tokenizer model type 'Sentencepiece'"));
    }

    #[test]
    fn a_file_past_the_cap_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_TOKENIZER_BYTES + 1).unwrap();
        let error = format!("{:#}", load(&path).unwrap_err());
        assert!(error.contains("larger than 256 MiB; refused"), "{error}");
    }
}
