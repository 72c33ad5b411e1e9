//! A SentencePiece-style BPE engine: added-token split, `Metaspace`, and BPE with byte
//! fallback, written against `tokenizers` 0.23 (`AddedVocabulary::find_matches`,
//! `Metaspace::pre_tokenize`, `BPE::merge_word` / `Word::merge_all`), because `fastokens`
//! does not take `Metaspace`.
//!
//! `Metaspace` with `split: false` leaves the whole text between two added tokens as one
//! "word", often thousands of characters. The merge loop is the reference's (lowest rank
//! first, then leftmost), but the word is first cut where no merge can ever join the two
//! sides (see [`Bridges`]), so each piece merges alone and repeats come from a cache.

use std::collections::BinaryHeap;
use std::sync::RwLock;

use daachorse::{DoubleArrayAhoCorasick, DoubleArrayAhoCorasickBuilder, MatchKind};
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;

/// How many distinct pieces the merge cache keeps before it starts over.
const CACHE_CAPACITY: usize = 100_000;
/// Pieces longer than this (in bytes) are merged every time, not cached.
const CACHE_MAX_PIECE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrependScheme {
    Always,
    First,
    Never,
}

/// Every boundary `(last char of A, first char of B)` over the merges `(A, B)`. The first
/// merge that joins two neighbouring characters must put its own seam exactly between them,
/// so a boundary whose pair is not here is never crossed by any token.
struct Bridges(FxHashSet<(char, char)>);

/// Word bytes -> their token ids, filled as words are first encoded.
type PieceCache = FxHashMap<Box<[u8]>, Box<[u32]>>;

pub struct SentencePieceBpe {
    added: Option<DoubleArrayAhoCorasick<u32>>,
    replacement: char,
    prepend: PrependScheme,
    split: bool,
    char_ids: CharIds,
    byte_ids: Option<[u32; 256]>,
    unk: Option<(u32, char, char)>,
    fuse_unk: bool,
    /// Whole words looked up before merging (`ignore_merges`).
    words: Option<FxHashMap<Box<str>, u32>>,
    merges: FxHashMap<(u32, u32), (u32, u32)>,
    bridges: Bridges,
    cache: RwLock<PieceCache>,
}

/// Vocabulary ids of single characters: a table for the Basic Multilingual Plane (looked up
/// once per character of every word), a map above it.
struct CharIds {
    bmp: Box<[u32]>,
    astral: FxHashMap<char, u32>,
}

impl CharIds {
    const NONE: u32 = u32::MAX;

    fn new(chars: impl Iterator<Item = (char, u32)>) -> Self {
        let mut bmp = vec![Self::NONE; 0x10000].into_boxed_slice();
        let mut astral = FxHashMap::default();
        for (c, id) in chars {
            match bmp.get_mut(c as usize) {
                Some(slot) => *slot = id,
                None => {
                    astral.insert(c, id);
                }
            }
        }
        CharIds { bmp, astral }
    }

    #[inline]
    fn get(&self, c: char) -> Option<u32> {
        match self.bmp.get(c as usize) {
            Some(&id) => (id != Self::NONE).then_some(id),
            None => self.astral.get(&c).copied(),
        }
    }
}

/// One symbol of a word being merged (the reference's `Symbol`).
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: isize,
    next: isize,
    len: usize,
    /// Byte offset in the word (a byte-fallback symbol starts inside its character).
    start: usize,
}

/// A pending merge, ordered as the reference's `Merge`: lowest rank, then lowest position.
#[derive(PartialEq, Eq)]
struct Merge {
    rank: u32,
    pos: usize,
    new_id: u32,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn first_last(s: &str) -> Option<(char, char)> {
    Some((s.chars().next()?, s.chars().next_back()?))
}

impl SentencePieceBpe {
    /// Builds the engine from a serialized tokenizer whose components the gate accepted.
    /// `added` is every added token's `(content, id)`.
    pub fn new(model: &Value, metaspace: &Value, added: &[(String, u32)]) -> Result<Self, String> {
        let vocab: FxHashMap<&str, u32> = model["vocab"]
            .as_object()
            .ok_or("model.vocab is not a map")?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.as_str(),
                    v.as_u64().ok_or("vocab id is not a number")? as u32,
                ))
            })
            .collect::<Result<_, &str>>()?;
        let char_ids = CharIds::new(vocab.iter().filter_map(|(k, &id)| {
            let mut chars = k.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some((c, id)),
                _ => None,
            }
        }));
        let byte_ids = if model["byte_fallback"].as_bool() == Some(true) {
            let ids: Option<Vec<u32>> = (0..=255u8)
                .map(|b| vocab.get(format!("<{b:#04X}>").as_str()).copied())
                .collect();
            // With some byte tokens missing the reference falls back per character; not modelled.
            let ids = ids.ok_or("byte_fallback without all 256 <0xXX> tokens")?;
            Some(ids.try_into().expect("256 byte ids"))
        } else {
            None
        };
        let unk = match model["unk_token"].as_str() {
            Some(name) => {
                let id = *vocab
                    .get(name)
                    .ok_or_else(|| format!("unk_token {name:?} is not in the vocabulary"))?;
                let (first, last) = first_last(name).ok_or("empty unk_token")?;
                Some((id, first, last))
            }
            None => None,
        };
        let mut merges = FxHashMap::default();
        let mut bridges = FxHashSet::default();
        for (rank, merge) in model["merges"]
            .as_array()
            .ok_or("model.merges is not a list")?
            .iter()
            .enumerate()
        {
            let (a, b) = match merge {
                Value::String(s) => s
                    .split_once(' ')
                    .ok_or_else(|| format!("merge {s:?} has no space"))?,
                Value::Array(pair) if pair.len() == 2 => (
                    pair[0].as_str().ok_or("merge part is not a string")?,
                    pair[1].as_str().ok_or("merge part is not a string")?,
                ),
                other => return Err(format!("bad merge {other}")),
            };
            let id = |s: &str| {
                vocab
                    .get(s)
                    .copied()
                    .ok_or_else(|| format!("merge token {s:?} is not in the vocabulary"))
            };
            let new_id = id(&format!("{a}{b}"))?;
            // A later duplicate overwrites an earlier one, as the reference's map build does.
            merges.insert((id(a)?, id(b)?), (rank as u32, new_id));
            let (Some((_, a_last)), Some((b_first, _))) = (first_last(a), first_last(b)) else {
                return Err(format!("empty merge part in {a:?} {b:?}"));
            };
            bridges.insert((a_last, b_first));
        }
        let replacement = metaspace["replacement"]
            .as_str()
            .and_then(|s| {
                let mut c = s.chars();
                c.next().filter(|_| c.next().is_none())
            })
            .ok_or("Metaspace replacement is not one character")?;
        let prepend = match metaspace["prepend_scheme"].as_str() {
            Some("always") => PrependScheme::Always,
            Some("first") => PrependScheme::First,
            Some("never") => PrependScheme::Never,
            other => return Err(format!("Metaspace prepend_scheme {other:?}")),
        };
        let added = if added.is_empty() {
            None
        } else {
            let pairs: Vec<(&str, u32)> = added.iter().map(|(s, id)| (s.as_str(), *id)).collect();
            Some(
                DoubleArrayAhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build_with_values(pairs)
                    .map_err(|e| format!("added tokens: {e}"))?,
            )
        };
        Ok(SentencePieceBpe {
            added,
            replacement,
            prepend,
            split: metaspace["split"].as_bool().unwrap_or(true),
            char_ids,
            byte_ids,
            unk,
            fuse_unk: model["fuse_unk"].as_bool() == Some(true),
            words: (model["ignore_merges"].as_bool() == Some(true))
                .then(|| vocab.iter().map(|(k, &id)| (Box::from(*k), id)).collect()),
            merges,
            bridges: Bridges(bridges),
            cache: RwLock::default(),
        })
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut at = 0;
        if let Some(added) = &self.added {
            for m in added.leftmost_find_iter(text) {
                if at < m.start() {
                    self.encode_segment(&text[at..m.start()], at == 0, &mut ids);
                }
                ids.push(m.value());
                at = m.end();
            }
        }
        if at < text.len() {
            self.encode_segment(&text[at..], at == 0, &mut ids);
        }
        ids
    }

    /// `Metaspace::pre_tokenize` on one segment between added tokens, then BPE per word.
    fn encode_segment(&self, segment: &str, at_start: bool, ids: &mut Vec<u32>) {
        let mut word = String::with_capacity(segment.len() + 3);
        let prepend = match self.prepend {
            PrependScheme::Always => true,
            PrependScheme::First => at_start,
            PrependScheme::Never => false,
        };
        if prepend && !segment.starts_with([' ', self.replacement]) {
            word.push(self.replacement);
        }
        for c in segment.chars() {
            word.push(if c == ' ' { self.replacement } else { c });
        }
        if !self.split {
            return self.encode_word(&word, ids);
        }
        // `split: true` cuts before every replacement character (MergedWithNext).
        let mut start = 0;
        for (i, c) in word.char_indices() {
            if c == self.replacement && i > start {
                self.encode_word(&word[start..i], ids);
                start = i;
            }
        }
        self.encode_word(&word[start..], ids);
    }

    /// The characters of `word` as the reference's `merge_word` turns them into symbols:
    /// a vocabulary character, else its bytes' `<0xXX>` tokens, else (fused) unknown.
    /// Returns the symbols and, per symbol, the characters at its two ends as merges see them.
    fn symbols(&self, word: &str) -> (Vec<Symbol>, Vec<(char, char)>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut ends = Vec::with_capacity(word.len());
        // A pending unknown run: (id, start byte, length).
        let mut unk: Option<(u32, usize, usize)> = None;
        let push = |symbols: &mut Vec<Symbol>,
                    ends: &mut Vec<(char, char)>,
                    id: u32,
                    start: usize,
                    len: usize,
                    end: (char, char)| {
            let i = symbols.len() as isize;
            symbols.push(Symbol {
                id,
                prev: i - 1,
                next: i + 1,
                len,
                start,
            });
            ends.push(end);
        };
        for (at, c) in word.char_indices() {
            let len = c.len_utf8();
            if let Some(id) = self.char_ids.get(c) {
                if let Some((uid, ustart, ulen)) = unk.take() {
                    push(&mut symbols, &mut ends, uid, ustart, ulen, self.unk_ends());
                }
                push(&mut symbols, &mut ends, id, at, len, (c, c));
                continue;
            }
            if let Some(bytes) = &self.byte_ids {
                let mut buf = [0u8; 4];
                for (k, &b) in c.encode_utf8(&mut buf).as_bytes().iter().enumerate() {
                    push(
                        &mut symbols,
                        &mut ends,
                        bytes[b as usize],
                        at + k,
                        1,
                        ('<', '>'),
                    );
                }
                continue;
            }
            if let Some((uid, _, _)) = self.unk {
                unk = match unk {
                    Some((_, ustart, ulen)) if self.fuse_unk => Some((uid, ustart, ulen + len)),
                    Some((prev, ustart, ulen)) => {
                        push(&mut symbols, &mut ends, prev, ustart, ulen, self.unk_ends());
                        Some((uid, at, len))
                    }
                    None => Some((uid, at, len)),
                };
            }
            // No byte fallback and no unknown token: the reference drops the character.
        }
        if let Some((uid, ustart, ulen)) = unk {
            push(&mut symbols, &mut ends, uid, ustart, ulen, self.unk_ends());
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        (symbols, ends)
    }

    fn unk_ends(&self) -> (char, char) {
        self.unk.map_or(('\0', '\0'), |(_, f, l)| (f, l))
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if let Some(&id) = self.words.as_ref().and_then(|w| w.get(word)) {
            ids.push(id);
            return;
        }
        let (symbols, ends) = self.symbols(word);
        // Cut at every boundary no merge can cross; each piece then merges on its own.
        let mut start = 0;
        for i in 0..symbols.len() {
            let cut =
                i + 1 == symbols.len() || !self.bridges.0.contains(&(ends[i].1, ends[i + 1].0));
            if cut {
                let text =
                    &word.as_bytes()[symbols[start].start..symbols[i].start + symbols[i].len];
                self.merge_piece(text, &symbols[start..=i], ids);
                start = i + 1;
            }
        }
    }

    fn merge_piece(&self, text: &[u8], symbols: &[Symbol], ids: &mut Vec<u32>) {
        if symbols.len() == 1 {
            ids.push(symbols[0].id);
            return;
        }
        let cacheable = text.len() <= CACHE_MAX_PIECE;
        if cacheable {
            if let Some(hit) = self.cache.read().expect("cache lock").get(text) {
                ids.extend_from_slice(hit);
                return;
            }
        }
        let start = ids.len();
        self.merge_all(symbols, ids);
        if cacheable {
            let mut cache = self.cache.write().expect("cache lock");
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(text.into(), ids[start..].into());
        }
    }

    /// The reference's `Word::merge_all` without dropout, on symbols re-linked from 0.
    fn merge_all(&self, piece: &[Symbol], ids: &mut Vec<u32>) {
        let n = piece.len();
        let mut symbols: Vec<Symbol> = piece
            .iter()
            .enumerate()
            .map(|(i, s)| Symbol {
                prev: i as isize - 1,
                next: if i + 1 == n { -1 } else { i as isize + 1 },
                ..*s
            })
            .collect();
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                self.merges
                    .get(&(w[0].id, w[1].id))
                    .map(|&(rank, new_id)| Merge { rank, pos, new_id })
            })
            .collect();
        while let Some(top) = queue.pop() {
            let current = symbols[top.pos];
            if current.len == 0 || current.next == -1 {
                continue;
            }
            let next_pos = current.next as usize;
            let right = symbols[next_pos];
            if self
                .merges
                .get(&(current.id, right.id))
                .is_none_or(|&(_, id)| id != top.new_id)
            {
                continue;
            }
            symbols[top.pos] = Symbol {
                id: top.new_id,
                next: right.next,
                len: current.len + right.len,
                ..current
            };
            symbols[next_pos].len = 0;
            if right.next >= 0 {
                symbols[right.next as usize].prev = top.pos as isize;
            }
            let merged = symbols[top.pos];
            if merged.prev >= 0 {
                let prev = symbols[merged.prev as usize];
                if let Some(&(rank, new_id)) = self.merges.get(&(prev.id, merged.id)) {
                    queue.push(Merge {
                        rank,
                        pos: merged.prev as usize,
                        new_id,
                    });
                }
            }
            if merged.next >= 0 {
                let next = symbols[merged.next as usize];
                if let Some(&(rank, new_id)) = self.merges.get(&(merged.id, next.id)) {
                    queue.push(Merge {
                        rank,
                        pos: top.pos,
                        new_id,
                    });
                }
            }
        }
        ids.extend(symbols.iter().filter(|s| s.len != 0).map(|s| s.id));
    }
}
