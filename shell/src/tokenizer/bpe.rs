//! Byte-pair encoding with the vocabulary and merges in flat arrays. `tokenizers`' own BPE keeps every
//! token's text twice (text → id and id → text, each text a separate allocation in a hash map) and its
//! merges in a third map: for Gemma 3's 262144 tokens and 514906 merges that is 68 MB, held for the
//! whole run, more than a quarter of the model's weights. Here the texts are one string indexed by id,
//! text → id is the ids sorted by text, and the merges are one array of (left, right, rank) sorted by
//! pair: ~10 MB, looked up by binary search. Tokenizing follows `tokenizers`' algorithm step for step
//! (`BPE::merge_word`, `Word::merge_all`), so the tokens are the same; the tests check that against
//! `tokenizers` itself.

use anyhow::{bail, Result};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::Token;

#[derive(Clone)]
pub struct Bpe {
    /// Every token's text, in id order: token `i` is `text[bounds[i]..bounds[i + 1]]`.
    text: String,
    bounds: Vec<u32>,
    /// The ids, sorted by their text.
    by_text: Vec<u32>,
    /// The merges, sorted by pair; a pair listed twice keeps its last rank, as in `tokenizers`. What a
    /// merge makes is looked up when it is made (each merge's result is checked to exist at load).
    merges: Vec<MergeRule>,
    options: Options,
}

#[derive(Clone, Copy)]
struct MergeRule {
    pair: (u32, u32),
    rank: u32,
}

/// The model section's settings, as tokenizer.json spells them.
#[derive(Clone, Deserialize)]
struct Options {
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
}

/// A BPE model section, its two large fields left unparsed until the options are known.
#[derive(Deserialize)]
struct Section<'a> {
    #[serde(flatten)]
    options: Options,
    #[serde(borrow)]
    vocab: Option<&'a RawValue>,
    #[serde(borrow)]
    merges: Option<&'a RawValue>,
}

impl Bpe {
    /// The model in a BPE section of tokenizer.json, or `None` for one this does not hold: dropout
    /// (random merges), or a vocabulary that is not one text per id for the ids 0..n.
    pub fn parse(json: &str) -> Result<Option<Bpe>> {
        let Section { options, vocab, merges } = serde_json::from_str(json)?;
        let (Some(vocab), Some(merges)) = (vocab, merges) else { bail!("Missing vocab/merges") };
        match options.dropout {
            Some(p) if !(0.0..=1.0).contains(&p) => bail!("dropout should be between 0 and 1, inclusive"),
            Some(p) if p > 0.0 => return Ok(None),
            _ => {}
        }
        let Some(mut bpe) = Bpe::with_vocabulary(serde_json::from_str::<Vocabulary>(vocab.get())?.0, options)? else {
            return Ok(None);
        };
        let mut rules = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(merges.get());
        // Resolving half a million merges by binary search took longer than the rest of the load.
        let ids: HashMap<&[u8], u32> = (0..bpe.len() as u32).map(|id| (bpe.token_bytes(id), id)).collect();
        MergeList { ids: &ids, prefix_len: bpe.options.continuing_subword_prefix.as_deref().map_or(0, str::len), rules: &mut rules }
            .deserialize(&mut deserializer)?;
        deserializer.end()?;
        rules.sort_unstable_by_key(|r| (r.pair, Reverse(r.rank)));
        rules.dedup_by_key(|r| r.pair);
        rules.shrink_to_fit();
        bpe.merges = rules;
        Ok(Some(bpe))
    }

    fn with_vocabulary(mut entries: Vec<(Cow<str>, u32)>, options: Options) -> Result<Option<Bpe>> {
        entries.sort_unstable_by_key(|e| e.1);
        if entries.iter().enumerate().any(|(i, e)| e.1 as usize != i) {
            return Ok(None);
        }
        let mut text = String::with_capacity(entries.iter().map(|e| e.0.len()).sum());
        let mut bounds = Vec::with_capacity(entries.len() + 1);
        bounds.push(0);
        for (token, _) in &entries {
            text.push_str(token);
            let Ok(end) = u32::try_from(text.len()) else { bail!("the vocabulary's text is larger than 4 GiB") };
            bounds.push(end);
        }
        drop(entries);
        let mut bpe = Bpe { text, bounds, by_text: Vec::new(), merges: Vec::new(), options };
        let mut by_text: Vec<u32> = (0..bpe.len() as u32).collect();
        by_text.sort_unstable_by(|&a, &b| bpe.token_bytes(a).cmp(bpe.token_bytes(b)));
        if by_text.windows(2).any(|w| bpe.token_bytes(w[0]) == bpe.token_bytes(w[1])) {
            return Ok(None);
        }
        bpe.by_text = by_text;
        Ok(Some(bpe))
    }

    fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    fn token(&self, id: u32) -> &str {
        let id = id as usize;
        &self.text[self.bounds[id] as usize..self.bounds[id + 1] as usize]
    }

    /// The token's bytes: what lookups compare, without `str`'s check of character boundaries.
    #[inline]
    fn token_bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        &self.text.as_bytes()[self.bounds[id] as usize..self.bounds[id + 1] as usize]
    }

    fn id(&self, token: &[u8]) -> Option<u32> {
        let found = self.by_text.binary_search_by(|&id| self.token_bytes(id).cmp(token));
        found.ok().map(|i| self.by_text[i])
    }

    /// The rank of merging `left` and `right`, if they merge.
    fn merge(&self, left: u32, right: u32) -> Option<u32> {
        self.merges.binary_search_by_key(&(left, right), |r| r.pair).ok().map(|i| self.merges[i].rank)
    }

    /// What merging `left` and `right` makes: their texts joined, the right one's subword prefix dropped.
    fn merged(&self, left: u32, right: u32) -> Option<u32> {
        let prefix = self.options.continuing_subword_prefix.as_deref().map_or(0, str::len);
        let joined = [self.token_bytes(left), self.token_bytes(right).get(prefix..)?].concat();
        self.id(&joined)
    }

    /// The symbols of `word` before merging: `BPE::merge_word`'s first half, unknown characters and
    /// byte fallback included, each with its length in bytes of `word`.
    fn symbols(&self, word: &str) -> tokenizers::Result<Vec<Symbol>> {
        let options = &self.options;
        let mut symbols = Vec::with_capacity(word.len());
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let at = symbols.len() as isize;
            if let Some(last) = symbols.last_mut() {
                last.next = at;
            }
            symbols.push(Symbol { id, prev: at - 1, next: -1, len });
        };
        let unk_id = || {
            let unk = options.unk_token.as_deref().unwrap_or_default();
            self.id(unk.as_bytes()).ok_or_else(|| format!("Unk token `{unk}` not found in the vocabulary"))
        };
        let mut unk: Option<(u32, usize)> = None;
        let mut piece = String::new();
        let mut chars = word.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            let byte_len = c.len_utf8();
            piece.clear();
            if let Some(prefix) = options.continuing_subword_prefix.as_deref().filter(|_| start > 0) {
                piece.push_str(prefix);
            }
            piece.push(c);
            if let Some(suffix) = options.end_of_word_suffix.as_deref().filter(|_| chars.peek().is_none()) {
                piece.push_str(suffix);
            }
            if let Some(id) = self.id(piece.as_bytes()) {
                if let Some((unk_id, unk_len)) = unk.take() {
                    push(&mut symbols, unk_id, unk_len);
                }
                push(&mut symbols, id, byte_len);
                continue;
            }
            if options.byte_fallback == Some(true) {
                let bytes: Option<Vec<u32>> = piece.bytes().map(|b| self.id(format!("<{b:#04X}>").as_bytes())).collect();
                if let Some(bytes) = bytes {
                    // As in `tokenizers`, an unknown run still pending is added after these.
                    bytes.into_iter().for_each(|id| push(&mut symbols, id, 1));
                    continue;
                }
            }
            if options.unk_token.is_some() {
                unk = match unk {
                    Some((id, len)) if options.fuse_unk == Some(true) => Some((id, len + byte_len)),
                    Some((id, len)) => {
                        push(&mut symbols, id, len);
                        Some((unk_id()?, byte_len))
                    }
                    None => Some((unk_id()?, byte_len)),
                };
            }
        }
        if let Some((id, len)) = unk {
            push(&mut symbols, id, len);
        }
        Ok(symbols)
    }

    /// `Word::merge_all` without dropout: the lowest-ranked mergeable pair first, leftmost among
    /// equals, until none is left.
    fn merge_all(&self, symbols: &mut Vec<Symbol>) {
        // (rank, position), smallest first.
        let mut queue: BinaryHeap<Reverse<(u32, usize)>> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(at, w)| self.merge(w[0].id, w[1].id).map(|rank| Reverse((rank, at))))
            .collect();
        while let Some(Reverse((rank, at))) = queue.pop() {
            if symbols[at].len == 0 || symbols[at].next == -1 {
                continue;
            }
            let next_at = symbols[at].next as usize;
            let right = symbols[next_at];
            // An entry made stale by an earlier merge no longer names this pair. (`tokenizers` compares
            // what the pair makes; the same text from the same position is the same pair, since symbols
            // only grow to the right, so comparing ranks is the same test.)
            if self.merge(symbols[at].id, right.id) != Some(rank) {
                continue;
            }
            let Some(merged) = self.merged(symbols[at].id, right.id) else { continue };
            let current = &mut symbols[at];
            current.id = merged;
            current.len += right.len;
            current.next = right.next;
            let current = *current;
            symbols[next_at].len = 0;
            if right.next > -1 && (right.next as usize) < symbols.len() {
                symbols[right.next as usize].prev = at as isize;
            }
            if current.prev >= 0 {
                let prev = current.prev as usize;
                if let Some(rank) = self.merge(symbols[prev].id, current.id) {
                    queue.push(Reverse((rank, prev)));
                }
            }
            let next = current.next as usize;
            if next < symbols.len() {
                if let Some(rank) = self.merge(current.id, symbols[next].id) {
                    queue.push(Reverse((rank, at)));
                }
            }
        }
        symbols.retain(|s| s.len != 0);
    }

    /// The vocabulary in id order, as `tokenizers` writes it.
    fn ordered_vocabulary(&self) -> OrderedVocabulary<'_> {
        OrderedVocabulary(self)
    }

    /// The merges in rank order, as pairs of texts.
    fn ranked_merges(&self) -> Vec<(&str, &str)> {
        let mut rules = self.merges.clone();
        rules.sort_unstable_by_key(|r| r.rank);
        rules.iter().map(|r| (self.token(r.pair.0), self.token(r.pair.1))).collect()
    }
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Bpe").field("tokens", &self.len()).field("merges", &self.merges.len()).finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: isize,
    next: isize,
    len: usize,
}

impl tokenizers::Model for Bpe {
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        if sequence.is_empty() {
            return Ok(vec![]);
        }
        if self.options.ignore_merges == Some(true) {
            if let Some(id) = self.id(sequence.as_bytes()) {
                return Ok(vec![Token::new(id, sequence.to_string(), (0, sequence.len()))]);
            }
        }
        let mut symbols = self.symbols(sequence)?;
        self.merge_all(&mut symbols);
        let mut start = 0;
        Ok(symbols
            .iter()
            .map(|s| {
                start += s.len;
                Token::new(s.id, self.token(s.id).to_owned(), (start - s.len, start))
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token.as_bytes())
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        ((id as usize) < self.len()).then(|| self.token(id).to_owned())
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.len() as u32).map(|id| (self.token(id).to_owned(), id)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.len()
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        let name = |file: &str| folder.join(prefix.map_or(file.to_string(), |p| format!("{p}-{file}")));
        let (vocab, merges) = (name("vocab.json"), name("merges.txt"));
        std::fs::write(&vocab, serde_json::to_string(&self.ordered_vocabulary())?)?;
        let lines: String = self.ranked_merges().iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        std::fs::write(&merges, format!("#version: 0.2\n{lines}"))?;
        Ok(vec![vocab, merges])
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

/// Written as `tokenizers` writes its BPE, field for field, so a tokenizer loaded here saves the same file.
impl Serialize for Bpe {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let o = &self.options;
        let mut model = serializer.serialize_struct("BPE", 10)?;
        model.serialize_field("type", "BPE")?;
        model.serialize_field("dropout", &o.dropout)?;
        model.serialize_field("unk_token", &o.unk_token)?;
        model.serialize_field("continuing_subword_prefix", &o.continuing_subword_prefix)?;
        model.serialize_field("end_of_word_suffix", &o.end_of_word_suffix)?;
        model.serialize_field("fuse_unk", &o.fuse_unk.unwrap_or(false))?;
        model.serialize_field("byte_fallback", &o.byte_fallback.unwrap_or(false))?;
        model.serialize_field("ignore_merges", &o.ignore_merges.unwrap_or(false))?;
        model.serialize_field("vocab", &self.ordered_vocabulary())?;
        model.serialize_field("merges", &self.ranked_merges())?;
        model.end()
    }
}

struct OrderedVocabulary<'a>(&'a Bpe);

impl Serialize for OrderedVocabulary<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for id in 0..self.0.len() as u32 {
            map.serialize_entry(self.0.token(id), &id)?;
        }
        map.end()
    }
}

/// A text from the file, borrowed when it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// The vocabulary object, in file order.
struct Vocabulary<'a>(Vec<(Cow<'a, str>, u32)>);

impl<'de> Deserialize<'de> for Vocabulary<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VocabularyVisitor;
        impl<'de> Visitor<'de> for VocabularyVisitor {
            type Value = Vocabulary<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from token to id")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Vocabulary<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Text(token), id)) = map.next_entry::<Text, u32>()? {
                    entries.push((token, id));
                }
                Ok(Vocabulary(entries))
            }
        }
        deserializer.deserialize_map(VocabularyVisitor)
    }
}

/// The merges list, resolved to ids as it is read, so its texts are never all held at once. Either
/// every entry is a pair `["a", "b"]` or every entry is a string `"a b"` (the older form, where lines
/// starting `#version` are skipped).
struct MergeList<'b> {
    ids: &'b HashMap<&'b [u8], u32>,
    prefix_len: usize,
    rules: &'b mut Vec<MergeRule>,
}

impl MergeList<'_> {
    /// The id of a token named in the merges, in the words of `tokenizers`' error.
    fn id(&self, token: &[u8]) -> Result<u32, String> {
        self.ids.get(token).copied().ok_or_else(|| format!("Token `{}` out of vocabulary", String::from_utf8_lossy(token)))
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry<'a> {
    Pair(#[serde(borrow)] Text<'a>, #[serde(borrow)] Text<'a>),
    Line(#[serde(borrow)] Text<'a>),
}

impl<'de> DeserializeSeed<'de> for MergeList<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MergeList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of merges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut lines = None;
        let mut joined = Vec::new();
        while let Some(entry) = seq.next_element::<MergeEntry>()? {
            let is_line = matches!(entry, MergeEntry::Line(_));
            if *lines.get_or_insert(is_line) != is_line {
                return Err(de::Error::custom("merges mix pairs and strings"));
            }
            let rank = self.rules.len() as u32;
            let (a, b) = match &entry {
                MergeEntry::Pair(a, b) => (&*a.0, &*b.0),
                MergeEntry::Line(line) if line.0.starts_with("#version") => continue,
                MergeEntry::Line(line) => match line.0.split(' ').collect::<Vec<_>>()[..] {
                    [a, b] => (a, b),
                    _ => return Err(de::Error::custom(format!("Merges text file invalid at line {}", rank + 1))),
                },
            };
            let Some(b_rest) = b.as_bytes().get(self.prefix_len..) else {
                return Err(de::Error::custom(format!("merge `{a} {b}`: `{b}` is shorter than the subword prefix")));
            };
            joined.clear();
            joined.extend_from_slice(a.as_bytes());
            joined.extend_from_slice(b_rest);
            let left = self.id(a.as_bytes()).map_err(de::Error::custom)?;
            let right = self.id(b.as_bytes()).map_err(de::Error::custom)?;
            self.id(&joined).map_err(de::Error::custom)?;
            self.rules.push(MergeRule { pair: (left, right), rank });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
