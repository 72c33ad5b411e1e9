//! Step 3 of `sanitize_control_tokens`: the render split at the control-token markers, the
//! marked tokens encoded as their ids and the rest as plain text (`encode_marked_chat`).

use tokenizers::{
    Model, NormalizedString, Normalizer, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

use crate::encode::Encoder;
use crate::error::{Error, Result};
use crate::template::pyfmt::py_str_repr;

use super::{IdsAndOffsets, MARK_END, MARK_START};

/// One piece of a marked render, `encode_marked_chat`'s split. `start` is in code points of
/// the whole render.
enum Piece<'a> {
    /// Text outside marks.
    Text { text: &'a str, start: usize },
    /// A marked control token (markers excluded), with its id.
    Marked {
        token: &'a str,
        start: usize,
        id: u32,
    },
}

/// Converts increasing byte offsets of one text into code-point offsets in linear time.
struct CharPos<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl CharPos<'_> {
    fn at(&mut self, byte: usize) -> usize {
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

/// Splits like `markers_re.split(chat)` with `markers_re` = `START(<any added token>)END|[START END]`:
/// a marked token is a START, an added token and an END; any other marker is lone and dropped,
/// but still ends the text piece before it.
///
/// Python's alternation can only close a mark at the first END after the START, since no added
/// token contains a marker character, so looking up the text up to that END as an added token
/// is the same match.
fn split_marked<'a>(tokenizer: &Tokenizer, text: &'a str) -> Vec<Piece<'a>> {
    // Both markers are 4 bytes in UTF-8.
    const W: usize = MARK_START.len_utf8();
    let added = tokenizer.get_added_vocabulary().get_vocab();
    let mut pos = CharPos {
        text,
        byte: 0,
        chars: 0,
    };
    let mut pieces = Vec::new();
    let mut piece_start = 0;
    // The first END at or after the last START's content (`usize::MAX`: none), found once per
    // END, so the scan stays linear even with many lone STARTs.
    let mut next_end = 0;
    while let Some(marker) = text[piece_start..]
        .find([MARK_START, MARK_END])
        .map(|i| piece_start + i)
    {
        pieces.push(Piece::Text {
            text: &text[piece_start..marker],
            start: pos.at(piece_start),
        });
        let inner = marker + W;
        piece_start = inner;
        if text[marker..].starts_with(MARK_START) {
            if next_end < inner {
                next_end = text[inner..]
                    .find(MARK_END)
                    .map_or(usize::MAX, |i| inner + i);
            }
            if let Some(&id) = text.get(inner..next_end).and_then(|token| added.get(token)) {
                pieces.push(Piece::Marked {
                    token: &text[inner..next_end],
                    start: pos.at(inner),
                    id,
                });
                piece_start = next_end + W;
            }
        }
    }
    pieces.push(Piece::Text {
        text: &text[piece_start..],
        start: pos.at(piece_start),
    });
    pieces
}

/// `_encode_without_added_tokens` of transformers' tokenizers backend: the whole text through
/// normalizer, pre-tokenizer and model, with no added-token matching at all. (The
/// tokenizers crate's `encode_special_tokens` would still match non-special added tokens.)
pub(super) fn encode_plain(tokenizer: &Tokenizer, text: &str) -> Result<IdsAndOffsets> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut normalized = NormalizedString::from(text);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized).map_err(err)?;
    }
    let mut pretokenized = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pretokenized).map_err(err)?;
    }
    let model = tokenizer.get_model();
    pretokenized
        .tokenize(|n| model.tokenize(n.get()))
        .map_err(err)?;
    let enc = pretokenized
        .into_encoding(None, 0, OffsetType::Char)
        .map_err(err)?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// `_encode_chat_piece`: encodes a piece after a newline, so a SentencePiece-style tokenizer
/// does not add the prefix space it adds at the start of a text, then drops the newline's
/// tokens; when the newline does not encode apart, encodes the piece alone. Offsets are made
/// relative to the piece.
fn encode_piece(
    encode: &dyn Fn(&str) -> Result<IdsAndOffsets>,
    piece: &str,
    newline_ids: &[u32],
) -> Result<IdsAndOffsets> {
    let (ids, offsets) = encode(&format!("\n{piece}"))?;
    if !ids.starts_with(newline_ids) {
        return encode(piece);
    }
    let n = newline_ids.len();
    let offsets = offsets[n..]
        .iter()
        .map(|&(s, e)| (s.saturating_sub(1), e.saturating_sub(1)))
        .collect();
    Ok((ids[n..].to_vec(), offsets))
}

/// `encode_marked_chat`: ids, and each token's (start, end) in code points of `text` itself
/// (marker characters stay in the coordinate system; no token covers a marker character).
///
/// Fails with transformers' ValueError text when plain text of a marked token encodes to the
/// token itself (the tokenizer could not tell the input's token from the template's).
pub fn encode_marked(encoder: &Encoder, text: &str) -> Result<IdsAndOffsets> {
    if !text.contains([MARK_START, MARK_END]) {
        // One piece, which transformers encodes plainly.
        return encoder.encode_with_char_offsets(text);
    }
    let tokenizer = encoder.tokenizer();
    let newline_ids = encoder.encode("\n")?;
    let normal = |s: &str| encoder.encode_with_char_offsets(s);
    let plain = |s: &str| encode_plain(tokenizer, s);
    let mut ids = Vec::new();
    let mut offsets = Vec::new();
    for (i, piece) in split_marked(tokenizer, text).into_iter().enumerate() {
        let (start, len, (piece_ids, piece_offsets)) = match piece {
            // The text before the first marker is encoded as it is, even when empty.
            Piece::Text { text, start } if i == 0 => (start, text.chars().count(), normal(text)?),
            Piece::Text { text: "", .. } => continue,
            Piece::Text { text, start } => (
                start,
                text.chars().count(),
                encode_piece(&normal, text, &newline_ids)?,
            ),
            Piece::Marked { token, start, id } => {
                let encoded = encode_piece(&plain, token, &newline_ids)?;
                if encoded.0.contains(&id) {
                    return Err(Error::Unsanitizable(format!(
                        "Can't sanitize {}: the tokenizer produces it from plain text",
                        py_str_repr(token)
                    )));
                }
                (start, token.chars().count(), encoded)
            }
        };
        ids.extend(piece_ids);
        offsets.extend(
            piece_offsets
                .into_iter()
                .map(|(s, e)| (start + s.min(len), start + e.min(len))),
        );
    }
    Ok((ids, offsets))
}
