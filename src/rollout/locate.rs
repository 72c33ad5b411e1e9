//! Where a sampled message's text lies among the template's tokens, and the errors when its
//! ids do not fit there.

use std::ops::Range;

use super::Sample;
use crate::core::{ChatTokenizer, Labelled};
use crate::error::{Error, Result};

/// The token index where characters from `at` on begin, if no token covers both sides of it.
pub(super) fn boundary(positions: &[(usize, usize)], at: usize) -> Option<usize> {
    let i = positions.partition_point(|p| p.0 < at);
    (i == 0 || positions[i - 1].1 <= at).then_some(i)
}

/// The characters from the start of `message`'s first field to the end of its last, in
/// `render`; None when the template prints none of its fields.
fn field_range(render: &Labelled, message: usize) -> Option<(usize, usize)> {
    let mut fields = render.located.spans.iter().filter(|s| s.message == message);
    let first = fields.next()?;
    Some(fields.fold((first.start, first.end), |(start, end), s| {
        (start.min(s.start), end.max(s.end))
    }))
}

fn shorten(text: &str) -> String {
    const KEEP: usize = 80;
    if text.chars().count() <= KEEP {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(KEEP).collect();
        format!("{head:?}...")
    }
}

impl ChatTokenizer {
    pub(super) fn decode(&self, ids: &[u32]) -> Result<String> {
        self.encoder
            .tokenizer()
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The template's tokens `[start, end)` for `message`'s text in `render`, the start chosen
    /// where they decode as `body` does; None when no start does.
    pub(super) fn region(
        &self,
        render: &Labelled,
        message: usize,
        body: &[u32],
    ) -> Result<Option<Range<usize>>> {
        let Some((first, _)) = field_range(render, message) else {
            return Err(Error::Rollout(format!(
                "message {message}: the template prints none of its fields, so sampled ids have no place"
            )));
        };
        let end = self.text_end(render, message)?;
        let after_previous = render
            .located
            .spans
            .iter()
            .filter(|s| s.message < message)
            .map(|s| s.end)
            .max()
            .unwrap_or(0);
        let pos = &render.positions;
        let ids = &render.tokenized.input_ids;
        let lowest = pos.partition_point(|p| p.0 < after_previous);
        // The first field's own start, or the token covering it.
        let at = pos.partition_point(|p| p.0 < first);
        let highest = match at > 0 && pos[at - 1].1 > first {
            true => at - 1,
            false => at,
        }
        .min(end);
        // The tokens' pieces spell text exactly (`decode` can drop a Metaspace space); the
        // decoded texts are compared only where an id has no piece.
        let spell = |ids: &[u32]| -> Result<Vec<u8>> {
            match self.encoder.spelling(ids) {
                Some(bytes) => Ok(bytes),
                None => Ok(self.decode(ids)?.into_bytes()),
            }
        };
        let sampled = spell(body)?;
        // Nearest the first field first: the template text before it is tried only as needed.
        for start in (lowest..=highest).rev() {
            if start > 0 && start < pos.len() && pos[start - 1].1 > pos[start].0 {
                continue; // two tokens share a character: no boundary
            }
            if spell(&ids[start..end])? == sampled {
                return Ok(Some(start..end));
            }
        }
        Ok(None)
    }

    /// [`Self::region`] of `sample`, read with its stop token and, failing that, without it.
    pub(super) fn find<'a>(
        &self,
        render: &Labelled,
        sample: Sample<'a>,
    ) -> Result<Option<(Range<usize>, Sample<'a>)>> {
        for reading in std::iter::once(sample).chain(sample.without_stop()) {
            if let Some(text) = self.region(render, reading.message, reading.body)? {
                return Ok(Some((text, reading)));
            }
        }
        Ok(None)
    }

    /// The token index after `message`'s last field in `render`.
    pub(super) fn text_end(&self, render: &Labelled, message: usize) -> Result<usize> {
        let last = field_range(render, message).map_or(0, |(_, end)| end);
        boundary(&render.positions, last).ok_or_else(|| {
            Error::Rollout(format!(
                "message {message}: a token covers both the end of its text and what the template \
                 prints after it, so the sampled ids cannot end there"
            ))
        })
    }

    /// The error for sampled ids that decode to other text than the template renders.
    pub(super) fn mismatch(&self, render: &Labelled, sample: &Sample<'_>) -> Error {
        let message = sample.message;
        let rendered = self
            .text_end(render, message)
            .ok()
            .and_then(|end| {
                let (first, _) = field_range(render, message)?;
                let start = render.positions.partition_point(|p| p.1 <= first);
                self.decode(&render.tokenized.input_ids[start.min(end)..end])
                    .ok()
            })
            .unwrap_or_default();
        let sampled = self.decode(sample.ids).unwrap_or_default();
        Error::Rollout(format!(
            "message {message}: the sampled ids decode to {}, but the template renders {} there",
            shorten(&sampled),
            shorten(&rendered)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::boundary;

    #[test]
    fn boundaries_lie_between_tokens_only() {
        let pos = [(0, 0), (0, 3), (3, 5), (5, 5), (5, 9)];
        assert_eq!(boundary(&pos, 0), Some(0));
        assert_eq!(boundary(&pos, 3), Some(2));
        assert_eq!(boundary(&pos, 5), Some(3));
        assert_eq!(boundary(&pos, 9), Some(5));
        assert_eq!(boundary(&pos, 4), None);
        assert_eq!(boundary(&pos, 7), None);
    }
}
