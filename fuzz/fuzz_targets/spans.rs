//! `{% generation %}` span tracking and the span-to-token mapper on arbitrary message text,
//! including the noncharacters used as markers: the marked render, stripped, must equal the
//! plain render, each span must hold exactly one assistant turn, and the mask must line up
//! with the tokens.

#![no_main]

#[path = "common.rs"]
mod common;

use arbitrary::Arbitrary;
use chatmask::spans::{strip_markers, token_mask};
use libfuzzer_sys::fuzz_target;

const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n\
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\
{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}";

#[derive(Arbitrary, Debug)]
struct Input {
    messages: Vec<common::Message>,
    marked: String,
    offsets: Vec<(u16, u16)>,
    spans: Vec<(u16, u16)>,
}

fuzz_target!(|input: Input| {
    let tok = common::tokenizer();
    if let Some(conv) = common::conversation(&input.messages) {
        if !conv.is_empty() {
            let args = tok
                .template_args(Some(TEMPLATE), vec![])
                .expect("template compiles");
            let plain = tok
                .render(&conv, conv.len(), false, &args)
                .expect("plain render");
            if let Ok((text, spans)) = tok.render_with_spans(&conv, conv.len(), false, &args) {
                assert_eq!(text, plain, "markers changed the render");
                let chars: Vec<char> = text.chars().collect();
                let turns: Vec<String> = input
                    .messages
                    .iter()
                    .filter(|m| m.role() == "assistant")
                    .map(|m| format!("{}<|im_end|>", m.content()))
                    .collect();
                let got: Vec<String> = spans
                    .iter()
                    .map(|&(s, e)| chars[s..e].iter().collect())
                    .collect();
                assert_eq!(got, turns, "spans do not hold the assistant turns");
                let (ids, mask) = tok.mask_from_spans(&text, &spans).expect("encode");
                assert_eq!(ids.len(), mask.len());
            }
        }
    }
    // The pure functions on arbitrary input.
    if let Ok((text, spans)) = strip_markers(&input.marked, ('\u{FDD0}', '\u{FDD1}')) {
        let n = text.chars().count();
        assert!(spans.iter().all(|&(s, e)| s <= e && e <= n));
    }
    // Token offsets from an encoder never run backwards; spans may (they are ignored).
    let offsets: Vec<(usize, usize)> = input
        .offsets
        .iter()
        .map(|&(a, b)| (a.min(b) as usize, a.max(b) as usize))
        .collect();
    let spans: Vec<(usize, usize)> = input
        .spans
        .iter()
        .map(|&(a, b)| (a as usize, b as usize))
        .collect();
    let mask = token_mask(&offsets, &spans);
    assert_eq!(mask.len(), offsets.len());
    for (&(ts, te), &m) in offsets.iter().zip(&mask) {
        let overlaps = spans.iter().any(|&(s, e)| s < e && s < te && ts < e);
        assert_eq!(m == 1, overlaps, "token ({ts},{te}) spans {spans:?}");
    }
});
