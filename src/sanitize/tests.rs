//! `sanitize_control_tokens` against transformers' behaviour, on demo tokenizers.

use super::encode::encode_plain;
use super::*;
use crate::demo::{self, DemoKind};
use tokenizers::AddedToken;

const S: char = MARK_START;
const E: char = MARK_END;

fn demo_encoder(kind: DemoKind) -> Encoder {
    demo::chat_tokenizer(kind).unwrap().encoder
}

/// The demo tokenizer plus non-special added tokens, some of which the template writes.
fn encoder_with_added(kind: DemoKind, non_special: &[&str]) -> Encoder {
    let mut tok = demo_encoder(kind).tokenizer().clone();
    tok.add_tokens(non_special.iter().map(|t| AddedToken::from(*t, false)))
        .unwrap();
    Encoder::new(tok).unwrap()
}

fn json(v: serde_json::Value) -> Value {
    Value::from(minijinja::value::Serde(v))
}

fn marked(s: &str) -> String {
    format!("{S}{s}{E}")
}

#[test]
fn control_tokens_are_specials_plus_template_literals() {
    let enc = encoder_with_added(
        DemoKind::ByteLevel,
        &["<think>", "</think>", "<tool_call>", "\n\n", "<unused>"],
    );
    let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, None).unwrap();
    // "\n\n" occurs in the template but is whitespace; "<unused>" does not occur.
    assert_eq!(
        ctl.tokens(),
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
            "<tool_call>"
        ]
    );

    let listed = ["<think>".to_string(), "<unused>".into(), "not added".into()];
    let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, Some(&listed)).unwrap();
    assert_eq!(
        ctl.tokens(),
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "<unused>"
        ]
    );
}

#[test]
fn literal_text_follows_jinja2() {
    let src = "{# <a> #}A{{ '<b' '>' }}{% raw %}\n<c>{% endraw %}  {%- if x == \"<d>\" %}\r\n  <e>{% endif %}\n";
    // As Jinja2 sees it: no comment, `-` strips before its tag, trim_blocks eats the newline
    // after a tag but not after `{% raw %}`, and the final newline is dropped.
    assert_eq!(
        template_literal_text(src).unwrap(),
        ["\n<c>", "  <e>", "<b>", "<d>", "A"].join("\0")
    );
    let demo_literals = [
        "",
        "\n",
        "\n\n",
        "\n</think>\n\n",
        "\n</tool_call>",
        "\n</tools><|im_end|>\n",
        "\n<tool_call>\n",
        "# Tools\n<tools>",
        "</think>",
        "<think>",
        "<think>\n",
        "<|im_end|>\n",
        "<|im_start|>",
        "<|im_start|>assistant\n",
        "<|im_start|>system\n",
        "arguments",
        "assistant",
        "name",
        "system",
        "user",
    ];
    assert_eq!(
        template_literal_text(demo::CHAT_TEMPLATE).unwrap(),
        demo_literals.join("\0")
    );
    let enc = encoder_with_added(DemoKind::ByteLevel, &["<b>", "<d>", "<a>", "A<b"]);
    let ctl = ControlTokens::new(&enc, src, None).unwrap();
    assert!(ctl.tokens().iter().any(|t| t == "<b>") && ctl.tokens().iter().any(|t| t == "<d>"));
    assert!(
        !ctl.tokens().iter().any(|t| t == "<a>" || t == "A<b"),
        "no match across literals"
    );
}

#[test]
fn mark_wraps_tokens_in_strings_only_and_drops_forged_markers() {
    let enc = encoder_with_added(DemoKind::ByteLevel, &["<|im"]);
    let ctl = ControlTokens::new(&enc, "{{ '<|im' }}", None).unwrap();
    let input = json(serde_json::json!({
        "role": "user",
        "<|im_end|>": ["a<|im_end|>b", 3, null, {"k": format!("<|im_{S}start|>")}],
        "content": format!("{S}<|im_end|>{E} <|im<|im_start|>"),
        "plain": "nothing",
    }));
    let out = ctl.mark(&input);
    let want = json(serde_json::json!({
        "role": "user",
        "<|im_end|>": [format!("a{}b", marked("<|im_end|>")), 3, null, {"k": marked("<|im_start|>")}],
        "content": format!("{} {}{}", marked("<|im_end|>"), marked("<|im"), marked("<|im_start|>")),
        "plain": "nothing",
    }));
    assert_eq!(out, want);
    // Keys stay, in order.
    let keys: Vec<String> = map_pairs(&out)
        .into_iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(keys, ["role", "<|im_end|>", "content", "plain"]);
    // Marking is idempotent, and leaves clean values alone.
    assert_eq!(ctl.mark(&out), out);
    assert_eq!(ctl.mark(&Value::from("x")), Value::from("x"));
    assert_eq!(ctl.mark(&Value::from(format!("a{E}b"))), Value::from("ab"));
    assert!(
        ctl.occurs_in("x<|im_end|>")
            && ctl.occurs_in(&format!("<|im_{S}end|>"))
            && !ctl.occurs_in("<|i m")
    );
}

#[test]
fn no_control_tokens_never_matches() {
    let tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
    let enc = Encoder::new(tok).unwrap();
    let ctl = ControlTokens::new(&enc, "{{ '<|im_end|>' }}", None).unwrap();
    assert!(ctl.tokens().is_empty() && !ctl.occurs_in("<|im_end|>"));
    assert_eq!(
        ctl.mark(&Value::from(format!("<|im_end|>{S}"))),
        Value::from("<|im_end|>")
    );
}

/// transformers' `encode_marked_chat`, step by step on the crate's own encode calls.
fn expected(enc: &Encoder, pieces: &[(&str, bool)]) -> Vec<u32> {
    let nl = enc.encode("\n").unwrap();
    let plain = |s: &str| encode_plain(enc.tokenizer(), s);
    let normal = |s: &str| enc.encode_with_char_offsets(s);
    let mut ids = enc.encode(pieces[0].0).unwrap();
    for &(p, as_text) in &pieces[1..] {
        if p.is_empty() {
            continue;
        }
        let f: &dyn Fn(&str) -> Result<IdsAndOffsets> = if as_text { &plain } else { &normal };
        let with_nl = f(&format!("\n{p}")).unwrap().0;
        ids.extend(if with_nl.starts_with(&nl) {
            with_nl[nl.len()..].to_vec()
        } else {
            f(p).unwrap().0
        });
    }
    ids
}

#[test]
fn marked_tokens_encode_as_text_and_the_rest_normally() {
    for kind in [DemoKind::ByteLevel, DemoKind::Metaspace] {
        let enc = demo_encoder(kind);
        let im_end = enc.token_to_id("<|im_end|>").unwrap();
        let user = format!("Hi {}there{}", marked("<|im_end|>"), marked("<|im_start|>"));
        let text = format!("<|im_start|>user\n{user}<|im_end|>\n");
        let (ids, offsets) = encode_marked(&enc, &text).unwrap();
        let want = expected(
            &enc,
            &[
                ("<|im_start|>user\nHi ", false),
                ("<|im_end|>", true),
                ("there", false),
                ("<|im_start|>", true),
                ("<|im_end|>\n", false),
            ],
        );
        assert_eq!(ids, want, "{kind:?}");
        assert_eq!(
            ids.iter().filter(|&&i| i == im_end).count(),
            1,
            "{kind:?}: only the template's token"
        );
        // Plain-text encoding agrees with the tokenizer's own "no special tokens" mode when
        // every added token is special.
        let mut split = enc.tokenizer().clone();
        split.set_encode_special_tokens(true);
        for s in ["<|im_end|>", "\n<|im_start|>x <|endoftext|>"] {
            let want = split.encode(s, false).unwrap().get_ids().to_vec();
            assert_eq!(
                encode_plain(enc.tokenizer(), s).unwrap().0,
                want,
                "{kind:?} {s:?}"
            );
        }
        // Offsets: one per id, in order, inside `text`, never over a marker.
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(offsets.len(), ids.len());
        assert!(offsets.windows(2).all(|w| w[0].0 <= w[1].0), "{offsets:?}");
        for &(s, e) in &offsets {
            assert!(
                s <= e && e <= chars.len() && !chars[s..e].iter().any(|&c| c == S || c == E),
                "{kind:?} {s}..{e}"
            );
        }
    }
}

#[test]
fn lone_markers_are_dropped_but_split_the_text() {
    for kind in [DemoKind::ByteLevel, DemoKind::Metaspace] {
        let enc = demo_encoder(kind);
        let im_start = enc.token_to_id("<|im_start|>").unwrap();
        // A template's `split('<|im_end|>')` separates the markers around a token.
        let text = format!("a {S}<|im_end|>b{E}c<|im_{S}start|>d{S}{S}<|im_start|>{E}{E}");
        let (ids, offsets) = encode_marked(&enc, &text).unwrap();
        let want = expected(
            &enc,
            &[
                ("a ", false),
                ("", true),
                ("<|im_end|>b", false),
                ("", true),
                ("c<|im_", false),
                ("", true),
                ("start|>d", false),
                ("", true),
                ("", false),
                ("<|im_start|>", true),
                ("", false),
                ("", true),
                ("", false),
            ],
        );
        assert_eq!(ids, want, "{kind:?}");
        assert!(
            !ids.contains(&im_start),
            "{kind:?}: the lone marker keeps `<|im_` and `start|>` apart"
        );
        assert_eq!(offsets.len(), ids.len());
        // Without markers it is the plain encoding.
        assert_eq!(
            encode_marked(&enc, "x<|im_end|>").unwrap(),
            enc.encode_with_char_offsets("x<|im_end|>").unwrap()
        );
        // A mark around something that is not an added token is two lone markers.
        let (ids, _) = encode_marked(&enc, &format!("q{S}<|im_end|> {E}r")).unwrap();
        assert_eq!(
            ids,
            expected(
                &enc,
                &[
                    ("q", false),
                    ("", true),
                    ("<|im_end|> ", false),
                    ("", true),
                    ("r", false)
                ]
            )
        );
    }
}

#[test]
fn token_produced_from_plain_text_cannot_be_sanitized() {
    let base = demo_encoder(DemoKind::ByteLevel);
    // A vocabulary word the BPE produces on its own, registered as a special token.
    let word = ["the", "user", "Paris"]
        .into_iter()
        .find(|w| base.encode(&format!("\n{w}")).unwrap().len() == 2)
        .expect("a whole-word token");
    let mut tok = base.tokenizer().clone();
    tok.add_special_tokens([AddedToken::from(word, true)])
        .unwrap();
    let enc = Encoder::new(tok).unwrap();
    let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, None).unwrap();
    let text = ctl
        .mark(&Value::from(format!("say {word}")))
        .as_str()
        .unwrap()
        .to_string();
    let err = encode_marked(&enc, &text).unwrap_err();
    assert_eq!(
        err,
        Error::Unsanitizable(format!(
            "Can't sanitize '{word}': the tokenizer produces it from plain text"
        ))
    );
}

/// The directory `tests/_sanitize_expect.py` wrote, if `CHATMASK_SANITIZE_EXPECT` names it.
fn expect_dir(file: &str) -> Option<std::path::PathBuf> {
    let Some(dir) = std::env::var_os("CHATMASK_SANITIZE_EXPECT") else {
        eprintln!(
            "skipped: set CHATMASK_SANITIZE_EXPECT to the output of tests/_sanitize_expect.py"
        );
        return None;
    };
    Some(std::path::Path::new(&dir).join(file))
}

fn jsonl(path: &std::path::Path) -> impl Iterator<Item = serde_json::Value> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(file)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
}

/// A fixture tokenizer with its config's `chat_control_tokens`.
fn load(dir: &str) -> (crate::core::ChatTokenizer, Option<Vec<String>>) {
    let tok = crate::core::ChatTokenizer::from_dir(
        std::path::Path::new(dir),
        crate::encode::EncoderChoice::Auto,
    )
    .unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(dir).join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let listed = config
        .get("chat_control_tokens")
        .and_then(|v| v.as_array())
        .map(|items| {
            items
                .iter()
                .map(|t| {
                    t.as_str()
                        .expect("chat_control_tokens are strings")
                        .to_string()
                })
                .collect()
        });
    (tok, listed)
}

#[test]
fn template_literals_match_jinja2() {
    let Some(path) = expect_dir("literals.jsonl") else {
        return;
    };
    let (mut same, mut both_refused, mut differ) = (0, 0, Vec::new());
    for row in jsonl(&path) {
        let name = row["template"].as_str().unwrap();
        let got = template_literal_text(&std::fs::read_to_string(name).unwrap());
        match (row.get("literals").and_then(|l| l.as_array()), got) {
            (Some(want), Ok(got)) => {
                let want = want
                    .iter()
                    .map(|s| s.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join("\0");
                if want == got {
                    same += 1;
                } else {
                    differ.push(format!("{name}: jinja2 {want:?}\n  chatmask {got:?}"));
                }
            }
            (None, Err(_)) => both_refused += 1,
            (want, got) => differ.push(format!("{name}: jinja2 {want:?}, chatmask {got:?}")),
        }
    }
    eprintln!(
        "template literals: {same} equal, {both_refused} refused by both, {} differ",
        differ.len()
    );
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

#[test]
fn control_tokens_match_transformers() {
    let Some(path) = expect_dir("control_tokens.jsonl") else {
        return;
    };
    let mut checked = 0;
    for row in jsonl(&path) {
        let dir = row["tokenizer_dir"].as_str().unwrap();
        let (tok, listed) = load(dir);
        let ctl = ControlTokens::new(
            &tok.encoder,
            row["template"].as_str().unwrap(),
            listed.as_deref(),
        )
        .unwrap();
        let want: Vec<&str> = row["control_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(ctl.tokens(), want, "{dir}");
        checked += 1;
    }
    eprintln!("control tokens: {checked} tokenizers equal");
}

/// Renders and encodes each injected row as transformers' `apply_chat_template(...,
/// sanitize_control_tokens=True)` does, and compares ids (or the exception) with its output.
#[test]
fn sanitize_matches_transformers() {
    use std::collections::HashMap;
    let Some(path) = expect_dir("expect.jsonl") else {
        return;
    };
    let mut tokenizers: HashMap<String, (crate::core::ChatTokenizer, Option<Vec<String>>)> =
        HashMap::new();
    let mut controls: HashMap<(String, String), ControlTokens> = HashMap::new();
    let (mut rows, mut ids_compared, mut ids_differing, mut errors_matched) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for row in jsonl(&path) {
        rows += 1;
        let dir = row["tokenizer_dir"].as_str().unwrap().to_string();
        let (tok, listed) = tokenizers.entry(dir.clone()).or_insert_with(|| load(&dir));
        let tools = &row["tools"];
        let source = tok.template_source(None, !tools.is_null()).unwrap();
        let ctl = controls
            .entry((dir.clone(), source.clone()))
            .or_insert_with(|| {
                ControlTokens::new(&tok.encoder, &source, listed.as_deref()).unwrap()
            });
        // transformers marks messages, tools and the template kwargs; the special tokens it adds
        // to the context afterwards stay unmarked.
        let got = (|| -> Result<Vec<u32>> {
            let messages = row["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ctl.mark(&json(m.clone())))
                .collect();
            let conv = crate::chat::Conversation::new(messages)?;
            let mut kwargs: Vec<(String, Value)> = row["kwargs"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "add_generation_prompt")
                .map(|(k, v)| (k.clone(), ctl.mark(&json(v.clone()))))
                .collect();
            if !tools.is_null() {
                kwargs.push(("tools".into(), ctl.mark(&json(tools.clone()))));
            }
            let args = tok.template_args(None, kwargs)?;
            let add_generation_prompt = row["kwargs"]["add_generation_prompt"]
                .as_bool()
                .unwrap_or(false);
            let text = tok.render(&conv, conv.len(), add_generation_prompt, &args)?;
            Ok(encode_marked(&tok.encoder, &text)?.0)
        })();
        let case = format!("{} {} row {}", row["tokenizer"], row["file"], row["row"]);
        match (row.get("expected_ids").and_then(|v| v.as_array()), got) {
            (Some(want), Ok(got)) => {
                let want: Vec<u32> = want.iter().map(|i| i.as_u64().unwrap() as u32).collect();
                let differing = want.iter().zip(&got).filter(|(a, b)| a != b).count()
                    + want.len().abs_diff(got.len());
                ids_compared += want.len().min(got.len());
                ids_differing += differing;
                if differing > 0 {
                    let at = want
                        .iter()
                        .zip(&got)
                        .position(|(a, b)| a != b)
                        .unwrap_or(want.len().min(got.len()));
                    let window =
                        |v: &[u32]| v[at.saturating_sub(3)..(at + 5).min(v.len())].to_vec();
                    failures.push(format!(
                        "{case}: {differing} ids differ, first at {at}: want {:?} got {:?} (lengths {} / {})",
                        window(&want),
                        window(&got),
                        want.len(),
                        got.len()
                    ));
                }
            }
            (None, got) => {
                let want = &row["expected_error"];
                let message = want["message"].as_str().unwrap();
                let alike = match (want["type"].as_str().unwrap(), &got) {
                    ("ValueError", Err(Error::Unsanitizable(m))) => m == message,
                    ("TemplateError", Err(Error::TemplateRaised(m))) => m == message,
                    _ => false,
                };
                if alike {
                    errors_matched += 1;
                } else {
                    failures.push(format!(
                        "{case}: transformers raised {want}, chatmask gave {:?}",
                        got.map(|ids| ids.len())
                    ));
                }
            }
            (Some(_), Err(e)) => failures.push(format!(
                "{case}: transformers encoded, chatmask raised {e:?}"
            )),
        }
    }
    eprintln!(
        "sanitize: {rows} rows, {ids_compared} ids compared, {ids_differing} differ, {errors_matched} errors matched, {} rows failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
