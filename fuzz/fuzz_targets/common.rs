//! Shared by the fuzz targets: the demo tokenizer (built once) and conversations from fuzz input.

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use chatmask::chat::Conversation;
use chatmask::core::{ChatTokenizer, TemplateSources};
use chatmask::demo::{self, DemoKind};
use chatmask::encode::EncoderChoice;
use minijinja::value::Value;

pub fn tokenizer() -> &'static ChatTokenizer {
    static TOK: OnceLock<ChatTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let json = demo::tokenizer_json(DemoKind::ByteLevel).expect("demo tokenizer");
        let sources = TemplateSources {
            default: Some(demo::CHAT_TEMPLATE.to_string()),
            named: vec![],
        };
        ChatTokenizer::new(
            &json,
            sources,
            vec![("eos_token".into(), demo::EOS_TOKEN.into())],
            EncoderChoice::Auto,
        )
        .expect("demo core")
    })
}

#[derive(Arbitrary, Debug)]
pub struct Message {
    role: u8,
    content: Option<String>,
    reasoning: Option<String>,
    tool_arguments: Option<String>,
}

const ROLES: [&str; 6] = ["system", "user", "assistant", "tool", "agent", ""];

impl Message {
    pub fn role(&self) -> &'static str {
        ROLES[self.role as usize % ROLES.len()]
    }

    pub fn content(&self) -> &str {
        self.content.as_deref().unwrap_or_default()
    }

    fn to_value(&self) -> Value {
        let mut pairs = vec![("role", Value::from(self.role()))];
        pairs.push((
            "content",
            self.content.as_deref().map_or(Value::from(()), Value::from),
        ));
        if let Some(r) = &self.reasoning {
            pairs.push(("reasoning_content", Value::from(r.as_str())));
        }
        if let Some(args) = &self.tool_arguments {
            let call = Value::from_pairs(vec![
                ("name", Value::from("f")),
                (
                    "arguments",
                    Value::from_pairs(vec![("x", Value::from(args.as_str()))]),
                ),
            ]);
            pairs.push((
                "tool_calls",
                Value::from(vec![Value::from_pairs(vec![("function", call)])]),
            ));
        }
        Value::from_pairs(pairs)
    }
}

pub fn conversation(messages: &[Message]) -> Option<Conversation> {
    Conversation::new(messages.iter().map(Message::to_value).collect()).ok()
}
