//! Where each message's fields land in a render: one marked render, else one field at a time
//! (markers, then the text that changes when the field is replaced).

use minijinja::value::Value;

use super::{ChatTokenizer, TemplateArgs};
use crate::chat::Conversation;
use crate::error::{Error, Result};
use crate::policy::SpanMethod;
use crate::spans::{
    diff_region, dummy_char, field_spans_in, for_each_string, has_plane16, mark_message,
    replace_field, FieldKind, FieldSpan, Marking, MAX_MARKED_MESSAGES,
};

impl ChatTokenizer {
    /// The plain render of the whole conversation and where each message's fields landed in
    /// it, with the method that found them and where each string content starts inside its
    /// span (see [`SpanRow::content_origin`]).
    pub fn message_spans(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<MessageSpans> {
        let plain = self.render(conv, conv.len(), add_generation_prompt, args)?;
        self.locate(conv, plain, add_generation_prompt, args)
    }

    /// [`Self::message_spans`] given the plain render of the whole conversation.
    pub fn locate(
        &self,
        conv: &Conversation,
        plain: String,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<MessageSpans> {
        let n = conv.len();
        let mut collides = args.holds_span_markers();
        for value in &conv.messages {
            for_each_string(value, &mut |s| collides |= has_plane16(s));
        }
        if collides {
            return Err(Error::Span(
                "the input or template contains a plane-16 private-use character (U+100000..U+10FFFD), which chatmask \
                 reserves as span markers"
                    .into(),
            ));
        }
        if n > MAX_MARKED_MESSAGES {
            return Err(Error::Span(format!(
                "{n} messages; span markers cover at most {MAX_MARKED_MESSAGES}"
            )));
        }
        let render_marked = |marking: Marking| -> Result<Option<Vec<FieldSpan>>> {
            let messages: Vec<Value> = conv
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| mark_message(m, i, marking))
                .collect();
            let marked = Conversation {
                messages,
                roles: conv.roles.clone(),
            };
            // A render that fails only because of the markers (a template that parses a field)
            // is a failed attempt, not an error of the row.
            let Ok(text) = self.render(&marked, n, add_generation_prompt, args) else {
                return Ok(None);
            };
            Ok(field_spans_in(&text, &plain))
        };
        let content_lead = |m: &Value, inner: bool| -> Option<usize> {
            let content = m.get_attr("content").ok()?;
            let s = content.as_str()?;
            Some(if inner {
                s.chars().take_while(|c| c.is_whitespace()).count()
            } else {
                0
            })
        };
        for inner in [false, true] {
            if let Some(spans) = render_marked(Marking {
                message: None,
                kind: None,
                inner,
            })? {
                let content_origin = conv
                    .messages
                    .iter()
                    .map(|m| content_lead(m, inner))
                    .collect();
                return Ok(MessageSpans {
                    text: plain,
                    spans,
                    method: SpanMethod::OneRender,
                    content_origin,
                });
            }
        }
        // One field at a time: markers first (checked), else the text that changes when the
        // field is replaced by a character found nowhere else.
        let mut spans = Vec::new();
        let mut content_origin = vec![None; n];
        let mut method = SpanMethod::PerField;
        let mut diffed: Vec<FieldSpan> = Vec::new();
        for (i, msg) in conv.messages.iter().enumerate() {
            for kind in [FieldKind::Content, FieldKind::Reasoning, FieldKind::Tool] {
                let only = Marking {
                    message: Some(i),
                    kind: Some(kind),
                    inner: false,
                };
                if mark_message(msg, i, only) == *msg {
                    continue; // nothing of this kind to locate
                }
                let mut found = false;
                for inner in [false, true] {
                    if let Some(field_spans) = render_marked(Marking { inner, ..only })? {
                        if kind == FieldKind::Content {
                            content_origin[i] = content_lead(msg, inner);
                        }
                        spans.extend(field_spans);
                        found = true;
                        break;
                    }
                }
                if found {
                    continue;
                }
                method = SpanMethod::Diff;
                let dummy = dummy_char(i, kind).to_string();
                let mut messages = conv.messages.clone();
                messages[i] = replace_field(msg, i, kind, &dummy);
                let replaced = Conversation {
                    messages,
                    roles: conv.roles.clone(),
                };
                let other = self
                    .render(&replaced, n, add_generation_prompt, args)
                    .map_err(|e| {
                        Error::Span(format!(
                            "message {i}: the template fails when its {kind:?} is replaced: {e}"
                        ))
                    })?;
                let (start, end) = diff_region(&plain, &other);
                if start < end {
                    diffed.push(FieldSpan {
                        message: i,
                        kind,
                        start,
                        end,
                    });
                }
            }
        }
        // A diff region is everything that changed; it must not reach into another message's text.
        for d in &diffed {
            let clash = spans
                .iter()
                .chain(&diffed)
                .find(|s| s.message != d.message && s.start < d.end && d.start < s.end);
            if let Some(c) = clash {
                return Err(Error::Span(format!(
                    "message {}'s {:?} changes text that message {} also owns; no exact span",
                    d.message, d.kind, c.message
                )));
            }
        }
        spans.extend(diffed);
        Ok(MessageSpans {
            text: plain,
            spans,
            method,
            content_origin,
        })
    }
}

/// See [`ChatTokenizer::message_spans`].
pub struct MessageSpans {
    pub text: String,
    pub spans: Vec<FieldSpan>,
    pub method: SpanMethod,
    pub content_origin: Vec<Option<usize>>,
}
