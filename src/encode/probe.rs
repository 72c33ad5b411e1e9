//! The load-time self-check: an embedded probe corpus encoded by both engines.
//!
//! The probes are the inputs where BPE engines are known to part ways: multilingual prose and
//! code, whitespace and newline runs, every added token alone, doubled, glued to text and cut
//! short, NFC/NFD pairs, emoji sequences, control characters and very long words. They are
//! encoded in groups (one `tokenizers` call per group keeps the check cheap); a group that
//! differs is re-encoded probe by probe to name the first difference.

use tokenizers::Tokenizer;

use super::engine::FastEngine;

/// Prose and code in many scripts, from `probes.txt` (one probe per line, `\n` written `⏎`).
const TEXT_PROBES: &str = include_str!("probes.txt");

/// How many bytes of probes go into one encode call.
const GROUP_BYTES: usize = 4096;

fn generated_probes() -> Vec<String> {
    let mut out = Vec::new();
    for ws in [
        " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n ", "\u{a0}", "\u{3000}",
        "\u{2028}", "\u{feff}",
    ] {
        for n in [1, 2, 3, 7, 16] {
            let run = ws.repeat(n);
            out.push(run.clone());
            out.push(format!("a{run}b"));
            out.push(format!("{run}word"));
            out.push(format!("word{run}"));
            out.push(format!("x.{run}(y)"));
        }
    }
    // Control characters, alone and inside words.
    for c in (0u32..0x20)
        .chain(0x7f..0xa0)
        .chain([0x200b, 0x200c, 0x200d, 0x2060, 0xfffd])
    {
        let c = char::from_u32(c).expect("valid control character");
        out.push(c.to_string());
        out.push(format!("ab{c}cd {c} e"));
    }
    // NFC / NFD pairs and combining marks.
    for s in [
        "é",
        "e\u{301}",
        "Å",
        "A\u{30a}",
        "ﬁ",
        "한국어",
        "\u{1100}\u{1161}\u{11a8}",
        "ṩ",
        "s\u{323}\u{307}",
        "x\u{300}\u{301}\u{302}\u{303}",
    ] {
        out.push(s.to_string());
        out.push(format!("Caf{s} {s}{s} résumé{s}"));
    }
    // Emoji sequences: modifiers, ZWJ families, flags, keycaps.
    for s in ["👍", "👍🏽", "👩‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇫🇷", "1️⃣", "🤖🤖🤖", "❤️‍🔥", "🫠"]
    {
        out.push(s.to_string());
        out.push(format!("ok {s}!{s} x{s}y"));
    }
    // Very long words and runs: the BPE merge of one long pre-token.
    out.push("a".repeat(5000));
    out.push("ab".repeat(2000));
    out.push("x".repeat(300) + &" y".repeat(300));
    out.push("日本語".repeat(500));
    out.push("1234567890".repeat(100));
    out.push("-".repeat(1000) + &"=".repeat(1000));
    out.push("_".repeat(777));
    out.push("▁".repeat(40) + " ▁ ▁▁ x▁y");
    out
}

/// Every added token alone, doubled, glued to text on either side, and cut short.
fn added_token_probes(tokenizer: &Tokenizer) -> Vec<String> {
    let mut contents: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    contents.sort();
    let mut out = Vec::new();
    for c in &contents {
        out.push(c.clone());
        out.push(format!("{c}{c}"));
        out.push(format!("Hello{c}world {c} x"));
        out.push(format!(" {c}\n{c}  "));
        let cut: Vec<usize> = c.char_indices().map(|(i, _)| i).skip(1).collect();
        if let (Some(&first), Some(&last)) = (cut.first(), cut.last()) {
            out.push(format!("{} {}x", &c[..last], &c[first..]));
            out.push(format!("a{}", &c[..last]));
        }
    }
    out
}

/// All probes for `tokenizer`.
pub fn probes(tokenizer: &Tokenizer) -> Vec<String> {
    let mut out: Vec<String> = TEXT_PROBES
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace('⏎', "\n"))
        .collect();
    out.extend(generated_probes());
    out.extend(added_token_probes(tokenizer));
    out
}

fn reference(tokenizer: &Tokenizer, text: &str) -> Option<Vec<u32>> {
    tokenizer
        .encode_fast(text, false)
        .ok()
        .map(|e| e.get_ids().to_vec())
}

fn describe(probe: &str) -> String {
    let shown: String = probe.chars().take(60).collect();
    let more = if probe.chars().count() > 60 {
        "…"
    } else {
        ""
    };
    format!("{shown:?}{more}")
}

/// The first probe the fast engine encodes differently from `tokenizers`, described.
pub fn first_difference(tokenizer: &Tokenizer, fast: &FastEngine) -> Option<String> {
    let all = probes(tokenizer);
    let mut group: Vec<&str> = Vec::new();
    let mut bytes = 0;
    let check_group = |group: &[&str]| -> Option<String> {
        // Probes are joined by a newline, itself probed above.
        let joined = group.join("\n");
        if reference(tokenizer, &joined) == fast.encode(&joined).ok() {
            return None;
        }
        for probe in group {
            let want = reference(tokenizer, probe);
            let got = fast.encode(probe).ok();
            if want != got {
                return Some(format!(
                    "probe {} gives {:?}, tokenizers gives {:?}",
                    describe(probe),
                    got,
                    want
                ));
            }
        }
        Some(format!(
            "a group of {} probes differs only when joined by newlines",
            group.len()
        ))
    };
    for probe in &all {
        group.push(probe);
        bytes += probe.len();
        if bytes >= GROUP_BYTES {
            if let Some(why) = check_group(&group) {
                return Some(why);
            }
            group.clear();
            bytes = 0;
        }
    }
    if group.is_empty() {
        None
    } else {
        check_group(&group)
    }
}
