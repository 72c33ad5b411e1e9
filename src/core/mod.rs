//! `ChatTokenizer`: a tokenizer, its chat templates and special tokens, and the pipeline
//! render → encode → label for one conversation. Locating the spans (`locate`) and the
//! span-based path under a `MaskPolicy` (`tokenize`) have their own files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use minijinja::value::Value;

use crate::chat::Conversation;
use crate::encode::{Encoder, EncoderChoice};
use crate::error::{Error, Result};
use crate::label::{self, Labeled, Mode};
use crate::sanitize::ControlTokens;
use crate::spans::{for_each_string, has_plane16, strip_markers, token_mask, MarkerPicker};
use crate::template::{render_context, ChatTemplate, RenderLimits, MARKERS_VAR};

mod locate;
mod tokenize;

pub use locate::MessageSpans;
pub use tokenize::{EncodedSpans, Labelled};

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
    /// [`TemplateArgs::holds_span_markers`], found once: shared arguments serve a whole batch.
    holds_span_markers: std::sync::OnceLock<bool>,
}

impl TemplateArgs {
    pub fn new(template: Arc<ChatTemplate>, base: Vec<(String, Value)>) -> Self {
        TemplateArgs {
            template,
            base,
            generation_prompt: Default::default(),
            holds_span_markers: Default::default(),
        }
    }

    /// Whether the template (literally or as a `\U0010` escape) or a base value holds a
    /// plane-16 character, which chatmask reserves as field span markers.
    pub fn holds_span_markers(&self) -> bool {
        *self.holds_span_markers.get_or_init(|| {
            let source = &self.template.source;
            let mut found = has_plane16(source) || source.contains("\\U0010");
            for (_, value) in &self.base {
                for_each_string(value, &mut |s| found |= has_plane16(s));
            }
            found
        })
    }
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
        Ok(TemplateArgs::new(template, base))
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
}
