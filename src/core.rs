//! `ChatTokenizer`: a tokenizer, its chat templates and special tokens, and the pipeline
//! render → encode → label for one conversation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use minijinja::value::Value;

use crate::chat::Conversation;
use crate::encode::{CharSpans, Encoder, EncoderChoice};
use crate::error::{Error, Result};
use crate::label::{self, Labeled, Mode};
use crate::policy::{self, MessageInfo, Policy, SpanMethod, SpanRow, SpanSource, Tokenized};
use crate::sanitize::{encode_marked, ControlTokens};
use crate::spans::{
    diff_region, dummy_char, for_each_string, has_plane16, mark_message, replace_field,
    strip_field_markers, strip_markers, token_mask, FieldKind, FieldSpan, MarkerPicker, Marking,
    MAX_MARKED_MESSAGES,
};
use crate::template::{render_context, ChatTemplate, RenderLimits, MARKERS_VAR};

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`: the named special tokens every template sees.
pub const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The chat templates a tokenizer carries: one, or several by name.
#[derive(Debug, Clone, Default)]
pub struct TemplateSources {
    pub default: Option<String>,
    pub named: Vec<(String, String)>,
}

/// Everything one render call needs besides the messages: the template and the base context.
pub struct TemplateArgs {
    pub template: Arc<ChatTemplate>,
    pub base: Vec<(String, Value)>,
    /// [`ChatTokenizer::generation_prompt`] for these arguments and its special tokens, found once.
    generation_prompt: std::sync::OnceLock<Option<(String, Vec<u32>)>>,
}

pub struct ChatTokenizer {
    pub encoder: Encoder,
    sources: TemplateSources,
    special_tokens: Vec<(String, String)>,
    pub eos_token_id: Option<u32>,
    compiled: Mutex<CompiledTemplates>,
    /// `chat_control_tokens` from tokenizer_config.json (see `sanitize`).
    pub chat_control_tokens: Option<Vec<String>>,
    /// Control tokens per template source, found once (parsing the template's literal text).
    control: Mutex<HashMap<Arc<str>, Arc<ControlTokens>>>,
}

/// Templates compiled under the current limits; changing the limits empties it.
#[derive(Default)]
struct CompiledTemplates {
    limits: RenderLimits,
    by_source: HashMap<String, Arc<ChatTemplate>>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Config(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
    }
}

/// A special token in a config: a string, or a serialized AddedToken `{"content": ...}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTokenizer {
    pub fn new(
        tokenizer_json: &str,
        sources: TemplateSources,
        special_tokens: Vec<(String, String)>,
        encoder: EncoderChoice,
    ) -> Result<Self> {
        let encoder = Encoder::from_json(tokenizer_json, encoder)?;
        let eos_token_id = special_tokens
            .iter()
            .find(|(k, _)| k == "eos_token")
            .and_then(|(_, v)| encoder.token_to_id(v));
        // Templates compile lazily: one minijinja cannot compile may still render through the
        // Python fallback, which the caller decides on with `compile_error`.
        Ok(ChatTokenizer {
            encoder,
            sources,
            special_tokens,
            eos_token_id,
            compiled: Mutex::default(),
            chat_control_tokens: None,
            control: Mutex::default(),
        })
    }

    /// Why minijinja cannot compile this template source, if it cannot.
    pub fn compile_error(&self, source: &str) -> Option<Error> {
        self.compile(source).err()
    }

    /// Every template source the tokenizer carries.
    pub fn template_sources(&self) -> Vec<String> {
        self.sources
            .default
            .iter()
            .cloned()
            .chain(self.sources.named.iter().map(|(_, s)| s.clone()))
            .collect()
    }

    /// Loads a local tokenizer directory with transformers 5's precedence: `chat_template.jinja`
    /// and `additional_chat_templates/*.jinja` win over `chat_template` in
    /// `tokenizer_config.json`; special tokens come from the config, then
    /// `special_tokens_map.json`.
    pub fn from_dir(dir: &Path, encoder: EncoderChoice) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tokenizer_path)
            .map_err(|e| Error::Config(format!("{}: {e}", tokenizer_path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();

        let mut sources = TemplateSources::default();
        let jinja = dir.join("chat_template.jinja");
        let mut from_files: Vec<(String, String)> = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&jinja) {
            from_files.push(("default".into(), text));
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("additional_chat_templates")) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                if p.extension().and_then(|e| e.to_str()) == Some("jinja") {
                    let name = p
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or_default()
                        .to_string();
                    let text = std::fs::read_to_string(&p)
                        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
                    from_files.push((name, text));
                }
            }
        }
        if from_files.len() == 1 && from_files[0].0 == "default" {
            sources.default = Some(from_files.remove(0).1);
        } else if !from_files.is_empty() {
            sources = Self::split_named(from_files);
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => sources.default = Some(s.clone()),
                Some(serde_json::Value::Array(items)) => {
                    let mut named = Vec::new();
                    for item in items {
                        let (Some(name), Some(t)) = (
                            item.get("name").and_then(|v| v.as_str()),
                            item.get("template").and_then(|v| v.as_str()),
                        ) else {
                            return Err(Error::Config(
                                "chat_template list entries need 'name' and 'template'".into(),
                            ));
                        };
                        named.push((name.to_string(), t.to_string()));
                    }
                    sources = Self::split_named(named);
                }
                _ => {}
            }
        }

        let mut special_tokens = Vec::new();
        for name in SPECIAL_TOKEN_NAMES {
            let value = config
                .get(name)
                .and_then(token_text)
                .or_else(|| special_map.get(name).and_then(token_text));
            if let Some(v) = value {
                special_tokens.push((name.to_string(), v));
            }
        }
        let mut tok = Self::new(&tokenizer_json, sources, special_tokens, encoder)?;
        tok.chat_control_tokens = match config.get("chat_control_tokens") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::Config("`chat_control_tokens` should be a list of strings".into())
                    })?,
            ),
            Some(other) => {
                return Err(Error::Config(format!(
                    "`chat_control_tokens` should be a list of strings, got {other}"
                )))
            }
        };
        Ok(tok)
    }

    /// A dict of templates keeps "default" as the default only through the name.
    fn split_named(named: Vec<(String, String)>) -> TemplateSources {
        TemplateSources {
            default: None,
            named,
        }
    }

    fn compile(&self, source: &str) -> Result<Arc<ChatTemplate>> {
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.by_source.get(source) {
            return Ok(t.clone());
        }
        let compiled = Arc::new(ChatTemplate::compile(source, cache.limits)?);
        cache.by_source.insert(source.to_string(), compiled.clone());
        Ok(compiled)
    }

    pub fn render_limits(&self) -> RenderLimits {
        self.compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .limits
    }

    /// Applies to renders that start after the call; running ones keep their template.
    pub fn set_render_limits(&self, limits: RenderLimits) {
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if cache.limits != limits {
            *cache = CompiledTemplates {
                limits,
                by_source: HashMap::new(),
            };
        }
    }

    /// The template transformers' `get_chat_template` would pick.
    pub fn template_source(&self, chat_template: Option<&str>, has_tools: bool) -> Result<String> {
        if !self.sources.named.is_empty() {
            let by_name = |n: &str| {
                self.sources
                    .named
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            return match chat_template {
                Some(name) => Ok(by_name(name).unwrap_or_else(|| name.to_string())),
                None => {
                    if has_tools {
                        if let Some(t) = by_name("tool_use") {
                            return Ok(t);
                        }
                    }
                    by_name("default").ok_or_else(|| {
                        let mut names: Vec<_> = self.sources.named.iter().map(|(k, _)| k.clone()).collect();
                        names.sort();
                        Error::Config(format!(
                            "This model has multiple chat templates with no default specified! Please either pass a \
                             chat template or the name of the template you wish to use to the `chat_template` \
                             argument. Available template names are {names:?}."
                        ))
                    })
                }
            };
        }
        match (chat_template, &self.sources.default) {
            (Some(t), _) => Ok(t.to_string()),
            (None, Some(t)) => Ok(t.clone()),
            (None, None) => Err(Error::Config(
                "Cannot use chat template functions because tokenizer.chat_template is not set and no template \
                 argument was passed!"
                    .into(),
            )),
        }
    }

    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    pub fn has_template(&self) -> bool {
        self.sources.default.is_some() || !self.sources.named.is_empty()
    }

    /// Resolves the template and builds the base context: special tokens, then `kwargs`
    /// (which win), with `tools` and `documents` always defined (None when not given).
    pub fn template_args(
        &self,
        chat_template: Option<&str>,
        kwargs: Vec<(String, Value)>,
    ) -> Result<TemplateArgs> {
        let has_tools = kwargs.iter().any(|(k, v)| k == "tools" && !v.is_none());
        let template = self.compile(&self.template_source(chat_template, has_tools)?)?;
        let mut base: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        for (k, v) in kwargs {
            match base.iter_mut().find(|(name, _)| *name == k) {
                Some(slot) => slot.1 = v,
                None => base.push((k, v)),
            }
        }
        for name in ["tools", "documents"] {
            if !base.iter().any(|(k, _)| k == name) {
                base.push((name.to_string(), Value::from(())));
            }
        }
        Ok(TemplateArgs {
            template,
            base,
            generation_prompt: Default::default(),
        })
    }

    /// Renders `conversation[:n]`.
    pub fn render(
        &self,
        conv: &Conversation,
        n: usize,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<String> {
        if n == 0 {
            return Err(Error::EmptyConversation);
        }
        args.template.render(&render_context(
            conv.prefix(n),
            add_generation_prompt,
            &args.base,
        ))
    }

    /// Renders `conversation[:n]` and returns the text with the `{% generation %}` spans (code points).
    pub fn render_with_spans(
        &self,
        conv: &Conversation,
        n: usize,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<(String, Vec<(usize, usize)>)> {
        if n == 0 {
            return Err(Error::EmptyConversation);
        }
        let mut picker = MarkerPicker::default();
        picker.see_template(&args.template.source);
        for value in conv.messages[..n]
            .iter()
            .chain(args.base.iter().map(|(_, v)| v))
        {
            for_each_string(value, &mut |s| picker.see(s));
        }
        let (start, end) = picker.pick()?;
        let mut base = args.base.clone();
        base.push((
            MARKERS_VAR.to_string(),
            Value::from(format!("{start}{end}")),
        ));
        let marked = args.template.render(&render_context(
            conv.prefix(n),
            add_generation_prompt,
            &base,
        ))?;
        strip_markers(&marked, (start, end))
    }

    /// Token ids of the rendered conversation and transformers' `assistant_masks` (bugs fixed).
    pub fn assistant_mask(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let (text, spans) =
            self.render_with_spans(conv, conv.len(), add_generation_prompt, args)?;
        self.mask_from_spans(&text, &spans)
    }

    /// Token ids of `text` and the assistant mask of the given spans (code points).
    pub fn mask_from_spans(
        &self,
        text: &str,
        spans: &[(usize, usize)],
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let (ids, offsets) = self.encoder.encode_with_char_offsets(text)?;
        Ok((ids, token_mask(&offsets, spans)))
    }

    /// Labels with renders from elsewhere (the Jinja2 fallback): `render(n, add_generation_prompt)`.
    pub fn label_with(
        &self,
        roles: &[crate::chat::Role],
        render: &label::RenderFn<'_>,
        mode: Mode,
        finish_length: bool,
    ) -> Result<Labeled> {
        label::label(
            &self.encoder,
            render,
            roles,
            mode,
            finish_length,
            self.eos_token_id,
        )
    }

    /// The reference's tokens and masks for one conversation (or generation-block labels).
    pub fn label(
        &self,
        conv: &Conversation,
        mode: Mode,
        finish_length: bool,
        args: &TemplateArgs,
    ) -> Result<Labeled> {
        if mode == Mode::Generation {
            let (ids, mask) = self.assistant_mask(conv, false, args)?;
            return Ok(label::label_generation(
                ids,
                &mask,
                finish_length,
                self.eos_token_id,
            ));
        }
        let render = |n: usize, gen: bool| self.render(conv, n, gen, args);
        label::label(
            &self.encoder,
            &render,
            &conv.roles,
            mode,
            finish_length,
            self.eos_token_id,
        )
    }

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
        let mut collides =
            has_plane16(&args.template.source) || args.template.source.contains("\\U0010");
        for value in conv.messages.iter().chain(args.base.iter().map(|(_, v)| v)) {
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
            Ok(strip_field_markers(&text)
                .filter(|(stripped, _)| *stripped == plain)
                .map(|(_, spans)| spans))
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
            TemplateArgs {
                template: args.template.clone(),
                base,
                generation_prompt: Default::default(),
            },
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
            positions,
            positions_derived,
        };
        let mut out = self.label_spans(conv, encoded, policy, args)?;
        out.control_found = control_found;
        Ok(policy::fit_length(&mut out, policy)?.then_some((out, located.method)))
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
            positions: &positions,
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
    pub positions: CharSpans,
    pub positions_derived: bool,
}

/// See [`ChatTokenizer::message_spans`].
pub struct MessageSpans {
    pub text: String,
    pub spans: Vec<FieldSpan>,
    pub method: SpanMethod,
    pub content_origin: Vec<Option<usize>>,
}
