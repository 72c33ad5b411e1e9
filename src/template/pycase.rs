//! Python's case mappings (`upper`, `lower`, `title`, `capitalize`, `swapcase`, `casefold`)
//! with the running Python's Unicode data.
//!
//! Rust's `char::to_uppercase` follows one fixed Unicode version and has no titlecase or case
//! folding at all. Jinja2 calls Python's methods, which follow that Python's `unicodedata`
//! (Python 3.11: Unicode 14, where 'ƛ'.upper() is still 'ƛ'). So the Python layer computes the
//! mappings from the running Python once per process and installs them here
//! (`python/chatmask/_unicode.py`); with them installed every mapping is Python's by
//! construction. Without them (the Rust unit tests) Rust's own mappings stand in, titlecase
//! as uppercase and folding as lowercasing.
//!
//! The installed data also lists the code points Rust's tables know and the running Python does
//! not: for Python those are unassigned, so not printable, not letters and not cased; the
//! predicates here and in `methods.rs`/`pyfmt.rs` ask [`is_unassigned`].

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// The running Python's case data (only non-identity mappings of non-ASCII code points).
#[derive(Debug, Default)]
pub struct Tables {
    pub upper: HashMap<char, String>,
    pub lower: HashMap<char, String>,
    /// Where titlecase differs from uppercase.
    pub title: HashMap<char, String>,
    /// Where case folding differs from lowercasing.
    pub casefold: HashMap<char, String>,
    pub unassigned: HashSet<char>,
    /// Python's Lowercase, Uppercase and titlecase flags (non-ASCII characters that have them):
    /// properties of assigned characters change between versions too ('ʕ' is lowercase in
    /// Unicode 14, not in 16).
    pub is_lower: HashSet<char>,
    pub is_upper: HashSet<char>,
    pub is_title: HashSet<char>,
    pub version: String,
}

static TABLES: OnceLock<Tables> = OnceLock::new();

/// Installs the running Python's tables; the first installation wins (one Python per process).
pub fn install(tables: Tables) {
    let _ = TABLES.set(tables);
}

/// The Unicode version case mappings follow: the installed Python's, or Rust's own.
pub fn version() -> String {
    TABLES.get().map_or_else(
        || {
            let (a, b, c) = char::UNICODE_VERSION;
            format!("{a}.{b}.{c} (Rust)")
        },
        |t| t.version.clone(),
    )
}

/// Whether the running Python's Unicode database lacks `c` (known to Rust's tables).
pub fn is_unassigned(c: char) -> bool {
    !c.is_ascii() && TABLES.get().is_some_and(|t| t.unassigned.contains(&c))
}

/// The code points the Python layer must check against its database: those Rust's tables treat
/// as printable, letters, cased or case-mapped (private use and surrogates never change).
pub fn known_text() -> String {
    (0x80..=0x10FFFFu32)
        .filter_map(char::from_u32)
        .filter(|&c| {
            !matches!(
                get_general_category(c),
                Gc::Unassigned | Gc::PrivateUse | Gc::Surrogate
            ) || c.is_alphabetic()
                || c.is_lowercase()
                || c.is_uppercase()
        })
        .collect()
}

fn push_mapped(
    c: char,
    out: &mut String,
    table: impl Fn(&Tables) -> &HashMap<char, String>,
    rust: impl Fn(char, &mut String),
) {
    match TABLES.get() {
        Some(t) if !c.is_ascii() => match table(t).get(&c) {
            Some(m) => out.push_str(m),
            None => out.push(c),
        },
        _ => rust(c, out),
    }
}

pub fn push_upper(c: char, out: &mut String) {
    push_mapped(c, out, |t| &t.upper, |c, out| out.extend(c.to_uppercase()));
}

/// Lowercasing one character out of context (a capital sigma lowers to 'σ').
pub fn push_lower(c: char, out: &mut String) {
    push_mapped(c, out, |t| &t.lower, |c, out| out.extend(c.to_lowercase()));
}

pub fn push_title(c: char, out: &mut String) {
    match TABLES.get().and_then(|t| t.title.get(&c)) {
        Some(m) => out.push_str(m),
        None => push_upper(c, out),
    }
}

pub fn push_casefold(c: char, out: &mut String) {
    match TABLES.get().and_then(|t| t.casefold.get(&c)) {
        Some(m) => out.push_str(m),
        None => push_lower(c, out),
    }
}

/// A flag from the installed tables for non-ASCII `c`, else Rust's own.
fn flag(c: char, set: impl Fn(&Tables) -> &HashSet<char>, rust: impl Fn(char) -> bool) -> bool {
    match TABLES.get() {
        Some(t) if !c.is_ascii() => set(t).contains(&c),
        _ => rust(c),
    }
}

/// Python's `Py_UNICODE_ISUPPER` / `ISLOWER` / `ISTITLE`, for this Python's database.
pub fn is_upper(c: char) -> bool {
    flag(c, |t| &t.is_upper, char::is_uppercase)
}

pub fn is_lower(c: char) -> bool {
    flag(c, |t| &t.is_lower, char::is_lowercase)
}

pub fn is_title(c: char) -> bool {
    flag(
        c,
        |t| &t.is_title,
        |c| get_general_category(c) == Gc::TitlecaseLetter,
    )
}

/// Unicode's Cased property, which `title()` and the final-sigma rule use.
pub fn is_cased(c: char) -> bool {
    is_upper(c) || is_lower(c) || is_title(c)
}

/// Unicode's Case_Ignorable: categories Mn, Me, Cf, Lm, Sk and the word-break classes
/// MidLetter, MidNumLet and Single_Quote (a short fixed list).
fn is_case_ignorable(c: char) -> bool {
    if is_unassigned(c) {
        return false;
    }
    matches!(
        c,
        '\'' | '.'
            | ':'
            | '\u{b7}'
            | '\u{387}'
            | '\u{55f}'
            | '\u{5f4}'
            | '\u{2018}'
            | '\u{2019}'
            | '\u{2024}'
            | '\u{2027}'
            | '\u{fe13}'
            | '\u{fe52}'
            | '\u{fe55}'
            | '\u{ff07}'
            | '\u{ff0e}'
            | '\u{ff1a}'
    ) || matches!(
        get_general_category(c),
        Gc::NonspacingMark
            | Gc::EnclosingMark
            | Gc::Format
            | Gc::ModifierLetter
            | Gc::ModifierSymbol
    )
}

/// CPython's `handle_capital_sigma`: 'ς' when the sigma at `i` ends a word.
fn final_sigma(chars: &[char], i: usize) -> bool {
    let before = chars[..i].iter().rev().find(|&&c| !is_case_ignorable(c));
    if !before.is_some_and(|&c| is_cased(c)) {
        return false;
    }
    let after = chars[i + 1..].iter().find(|&&c| !is_case_ignorable(c));
    !after.is_some_and(|&c| is_cased(c))
}

/// Lowers `chars[i]` the way Python's `lower()` does inside the whole string.
fn push_lower_at(chars: &[char], i: usize, out: &mut String) {
    if chars[i] == '\u{3a3}' {
        out.push(if final_sigma(chars, i) {
            '\u{3c2}'
        } else {
            '\u{3c3}'
        });
    } else {
        push_lower(chars[i], out);
    }
}

pub fn py_upper(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    s.chars().for_each(|c| push_upper(c, &mut out));
    out
}

pub fn py_lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    (0..chars.len()).for_each(|i| push_lower_at(&chars, i, &mut out));
    out
}

pub fn py_casefold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    s.chars().for_each(|c| push_casefold(c, &mut out));
    out
}

/// Python's `str.title()`: a cased character after a cased one is lowered, any other is
/// titlecased (so 'ß' becomes 'Ss', and a letter after an uncased letter such as 'ƻ' starts a
/// word).
pub fn py_title(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut previous_is_cased = false;
    for (i, &c) in chars.iter().enumerate() {
        if previous_is_cased {
            push_lower_at(&chars, i, &mut out);
        } else {
            push_title(c, &mut out);
        }
        previous_is_cased = is_cased(c);
    }
    out
}

/// Python's `str.capitalize()` (3.8+): the first character titlecased, the rest lowered.
pub fn py_capitalize(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for i in 0..chars.len() {
        if i == 0 {
            push_title(chars[0], &mut out);
        } else {
            push_lower_at(&chars, i, &mut out);
        }
    }
    out
}

/// Python's `str.swapcase()`: uppercase characters lowered (a sigma by its context), lowercase
/// ones uppered, others kept.
pub fn py_swapcase(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        if is_upper(c) {
            push_lower_at(&chars, i, &mut out);
        } else if is_lower(c) {
            push_upper(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}
