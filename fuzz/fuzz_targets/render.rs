//! Arbitrary template source and conversation through compile, render, encode and every
//! labelling mode. Errors are fine; a panic, hang or abort is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use arbitrary::Arbitrary;
use chatmask::core::TemplateArgs;
use chatmask::label::Mode;
use chatmask::template::{ChatTemplate, RenderLimits};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    template: String,
    messages: Vec<common::Message>,
    finish_length: bool,
}

fuzz_target!(|input: Input| {
    // A small budget keeps each case fast; the limits themselves are under test too.
    let limits = RenderLimits {
        fuel: Some(200_000),
        max_output_bytes: Some(1 << 20),
        ..RenderLimits::default()
    };
    let Ok(template) = ChatTemplate::compile(&input.template, limits) else {
        return;
    };
    let Some(conv) = common::conversation(&input.messages) else {
        return;
    };
    let tok = common::tokenizer();
    let args = TemplateArgs {
        template: Arc::new(template),
        base: vec![("eos_token".into(), "<|im_end|>".into())],
    };
    for mode in [Mode::Last, Mode::All, Mode::Multistep, Mode::Generation] {
        if let Ok(out) = tok.label(&conv, mode, input.finish_length, &args) {
            assert!(
                out.masks.iter().all(|&m| m == -100 || m >= 0),
                "labels are -100 or token ids"
            );
        }
    }
});
