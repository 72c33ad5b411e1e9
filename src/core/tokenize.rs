//! The span-based path: control tokens and the sanitized encode, the generation prompt, and a
//! conversation tokenized and labelled under a `MaskPolicy`.

use std::sync::Arc;

use minijinja::value::Value;

use super::{ChatTokenizer, MessageSpans, TemplateArgs};
use crate::chat::Conversation;
use crate::encode::CharSpans;
use crate::error::{Error, Result};
use crate::policy::{self, MessageInfo, Policy, SpanMethod, SpanRow, SpanSource, Tokenized};
use crate::sanitize::{encode_marked, ControlTokens};
use crate::spans::for_each_string;

impl ChatTokenizer {
    /// The control tokens `sanitize_control_tokens` protects for this template.
    pub fn control_tokens(&self, args: &TemplateArgs) -> Result<Arc<ControlTokens>> {
        let source = &args.template.source;
        if let Some(found) = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&**source)
        {
            return Ok(found.clone());
        }
        let found = Arc::new(ControlTokens::new(
            &self.encoder,
            source,
            self.chat_control_tokens.as_deref(),
        )?);
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.clone(), found.clone());
        Ok(found)
    }

    /// Whether any input string (messages, tools, keyword arguments) holds a control token's
    /// text, which unsanitized encoding turns into that control token.
    pub fn has_control_tokens(&self, conv: &Conversation, args: &TemplateArgs) -> Result<bool> {
        let control = self.control_tokens(args)?;
        let mut found = false;
        for value in conv.messages.iter().chain(self.caller_values(args)) {
            for_each_string(value, &mut |s| found |= control.occurs_in(s));
        }
        Ok(found)
    }

    /// The base-context values that came from the caller: not the tokenizer's own special
    /// tokens, which transformers adds after marking.
    fn caller_values<'a>(&'a self, args: &'a TemplateArgs) -> impl Iterator<Item = &'a Value> + 'a {
        args.base
            .iter()
            .filter(|(k, v)| {
                !self
                    .special_tokens
                    .iter()
                    .any(|(name, text)| name == k && v.as_str() == Some(text.as_str()))
            })
            .map(|(_, v)| v)
    }

    /// transformers' `_mark_chat_inputs`: the conversation and caller arguments with control
    /// tokens in their strings marked, so `encode_marked` encodes them as text.
    pub fn sanitized(
        &self,
        conv: &Conversation,
        args: &TemplateArgs,
    ) -> Result<(Conversation, TemplateArgs)> {
        let control = self.control_tokens(args)?;
        let messages = conv.messages.iter().map(|m| control.mark(m)).collect();
        let base = args
            .base
            .iter()
            .map(|(k, v)| {
                let special = self
                    .special_tokens
                    .iter()
                    .any(|(name, text)| name == k && v.as_str() == Some(text.as_str()));
                (k.clone(), if special { v.clone() } else { control.mark(v) })
            })
            .collect();
        Ok((
            Conversation {
                messages,
                roles: conv.roles.clone(),
            },
            TemplateArgs::new(args.template.clone(), base),
        ))
    }

    /// `apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`.
    pub fn encode_sanitized(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<Vec<u32>> {
        let (marked, marked_args) = self.sanitized(conv, args)?;
        let text = self.render(&marked, marked.len(), add_generation_prompt, &marked_args)?;
        Ok(encode_marked(&self.encoder, &text)?.0)
    }

    /// What `add_generation_prompt=True` appends after a one-message conversation, when the
    /// template renders that conversation as a prefix of the one with the prompt.
    pub fn generation_prompt<'a>(&self, args: &'a TemplateArgs) -> Option<&'a (String, Vec<u32>)> {
        args.generation_prompt
            .get_or_init(|| {
                let prompt = self.probe_generation_prompt(args)?;
                // Its special tokens (`<|im_start|>`, `<|start_header_id|>`) open turns.
                let mut ids = self.encoder.encode(&prompt).ok()?;
                ids.retain(|&id| self.encoder.is_special_added(id));
                Some((prompt, ids))
            })
            .as_ref()
    }

    fn probe_generation_prompt(&self, args: &TemplateArgs) -> Option<String> {
        let probe = Conversation::new(vec![Value::from_pairs(vec![
            ("role", Value::from("user")),
            ("content", Value::from("x")),
        ])])
        .ok()?;
        let without = self.render(&probe, 1, false, args).ok()?;
        let with = self.render(&probe, 1, true, args).ok()?;
        with.strip_prefix(without.as_str()).map(str::to_string)
    }

    /// Tokens, labels and `message_index` of one conversation under `policy`.
    pub fn tokenize(
        &self,
        conv: &Conversation,
        policy: &Policy,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<Option<(Tokenized, SpanMethod)>> {
        let mut labelled = self.tokenize_located(conv, policy, add_generation_prompt, args)?;
        let method = labelled.located.method;
        Ok(policy::fit_length(&mut labelled.tokenized, policy)?
            .then_some((labelled.tokenized, method)))
    }

    /// [`Self::tokenize`] before `fit_length`, with the located render and each token's
    /// characters kept: what a caller splicing tokens by message needs.
    pub fn tokenize_located(
        &self,
        conv: &Conversation,
        policy: &Policy,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<Labelled> {
        if conv.is_empty() {
            return Err(Error::EmptyConversation);
        }
        // Counted whether or not sanitizing; only sanitizing needs the control tokens to exist.
        let control_found = match self.has_control_tokens(conv, args) {
            Ok(found) => found,
            Err(e) if policy.sanitize_control_tokens => return Err(e),
            Err(_) => false,
        };
        let sanitized;
        let (conv, args) = if policy.sanitize_control_tokens {
            sanitized = self.sanitized(conv, args)?;
            (&sanitized.0, &sanitized.1)
        } else {
            (conv, args)
        };
        let located = self.message_spans(conv, add_generation_prompt, args)?;
        let generation = match policy.source {
            SpanSource::Generation => {
                let (text, spans) =
                    self.render_with_spans(conv, conv.len(), add_generation_prompt, args)?;
                if text != located.text {
                    return Err(Error::Internal(
                        "generation render differs from the plain render".into(),
                    ));
                }
                spans
            }
            SpanSource::Messages => Vec::new(),
        };
        let (ids, positions, positions_derived) = if policy.sanitize_control_tokens {
            let (ids, offsets) = encode_marked(&self.encoder, &located.text)?;
            (ids, offsets, false)
        } else {
            self.encoder.encode_with_positions(&located.text)?
        };
        let encoded = EncodedSpans {
            located: &located,
            generation: &generation,
            ids,
            positions: &positions,
            positions_derived,
        };
        let mut tokenized = self.label_spans(conv, encoded, policy, args)?;
        tokenized.control_found = control_found;
        Ok(Labelled {
            tokenized,
            located,
            positions,
        })
    }

    /// Labels and `message_index` under `policy` of a conversation whose spans are located
    /// and whose render is encoded (`fit_length` not applied, `control_found` false).
    pub fn label_spans(
        &self,
        conv: &Conversation,
        encoded: EncodedSpans<'_>,
        policy: &Policy,
        args: &TemplateArgs,
    ) -> Result<Tokenized> {
        let EncodedSpans {
            located,
            generation,
            ids,
            positions,
            positions_derived,
        } = encoded;
        let messages = conv
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| MessageInfo::read(m, i, policy))
            .collect::<Result<Vec<_>>>()?;
        let generation_prompt = self.generation_prompt(args);
        let row = SpanRow {
            text: &located.text,
            generation_prompt: generation_prompt.map(|(text, _)| text.as_str()),
            opener_ids: generation_prompt.map_or(&[], |(_, ids)| ids.as_slice()),
            ids: &ids,
            positions,
            spans: &located.spans,
            messages: &messages,
            content_origin: &located.content_origin,
            generation,
        };
        let policy::Labels {
            labels,
            message_index,
            straddles_start,
            straddling,
        } = policy::label(&row, policy, self.eos_token_id, &|id| {
            self.encoder.is_special_added(id)
        })?;
        Ok(Tokenized {
            input_ids: ids,
            labels,
            message_index,
            straddles_start,
            straddling,
            positions_derived,
            truncated: 0,
            control_found: false,
        })
    }
}

/// A located render and its tokens, for [`ChatTokenizer::label_spans`].
pub struct EncodedSpans<'a> {
    pub located: &'a MessageSpans,
    /// `{% generation %}` spans (empty unless the policy's source is generation blocks).
    pub generation: &'a [(usize, usize)],
    pub ids: Vec<u32>,
    pub positions: &'a [(usize, usize)],
    pub positions_derived: bool,
}

/// One conversation tokenized under a policy, with where its text and tokens lie.
pub struct Labelled {
    pub tokenized: Tokenized,
    pub located: MessageSpans,
    /// Each token's `(start, end)` in code points of `located.text`.
    pub positions: CharSpans,
}
