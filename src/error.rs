//! One error type for the core. The Python glue maps each variant onto the `chatmask` exception
//! hierarchy; nothing in the core panics on bad input.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The template does not compile.
    TemplateSyntax { detail: String, line: Option<usize> },
    /// The template failed while rendering (not through `raise_exception`).
    TemplateRender { detail: String, line: Option<usize> },
    /// The template exceeded a render limit (fuel, recursion, output size).
    TemplateLimit { limit: String, line: Option<usize> },
    /// The template called `raise_exception(message)`.
    TemplateRaised(String),
    /// transformers refuses to render an empty conversation; the reference hits this for
    /// prefixes `chat[:0]`.
    EmptyConversation,
    /// The reference reads `chat[i]["role"]` and raises KeyError when it is missing.
    MissingRole { message: usize },
    /// A message or conversation of the wrong shape.
    InvalidInput(String),
    /// The reference's numpy slice assignment failed to broadcast.
    Broadcast { from: usize, into: usize },
    /// The reference indexes `tokens[-1]` on an empty token list.
    EmptyTokens,
    /// Loading or running the tokenizer failed.
    Tokenizer(String),
    /// A tokenizer directory or config is missing or malformed.
    Config(String),
    /// A row longer than the policy's `max_length` that it may not cut.
    TooLong(String),
    /// `sanitize_control_tokens`: a marked control token's text encodes back to the token.
    Unsanitizable(String),
    /// No exact method located a message's text in the render.
    Span(String),
    /// Sampled ids that do not fit the conversation (other text, or no token boundary).
    Rollout(String),
    /// A bug in chatmask (a caught panic), reported instead of crashing the interpreter.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TemplateSyntax { detail, line } => match line {
                Some(l) => write!(f, "chat template syntax error on line {l}: {detail}"),
                None => write!(f, "chat template syntax error: {detail}"),
            },
            Error::TemplateRender { detail, line } => match line {
                Some(l) => write!(f, "chat template failed on line {l}: {detail}"),
                None => write!(f, "chat template failed: {detail}"),
            },
            Error::TemplateLimit { limit, line } => {
                write!(f, "chat template stopped: {limit}")?;
                if let Some(l) = line {
                    write!(f, " (line {l})")?;
                }
                f.write_str("; a template you trust can be given more with RenderLimits")
            }
            Error::TemplateRaised(msg) => f.write_str(msg),
            Error::EmptyConversation => {
                f.write_str("Cannot apply chat template to an empty conversation. Provide at least one message.")
            }
            Error::MissingRole { message } => write!(f, "message {message} has no 'role' key"),
            Error::InvalidInput(msg) => f.write_str(msg),
            Error::Broadcast { from, into } => {
                write!(f, "could not broadcast input array from shape ({from},) into shape ({into},)")
            }
            Error::EmptyTokens => f.write_str("list index out of range (the chat rendered to no tokens)"),
            Error::Tokenizer(msg) => write!(f, "tokenizer error: {msg}"),
            Error::Config(msg) => f.write_str(msg),
            Error::TooLong(msg) => write!(f, "row too long: {msg}"),
            Error::Unsanitizable(msg) => f.write_str(msg),
            Error::Span(msg) => write!(f, "cannot locate message text in the render: {msg}"),
            Error::Rollout(msg) => f.write_str(msg),
            Error::Internal(msg) => write!(f, "internal error in chatmask (please report): {msg}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f`, turning a panic into [`Error::Internal`]: a panic must never unwind into Python
/// or abort a worker thread.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(Error::Internal(msg))
    })
}
