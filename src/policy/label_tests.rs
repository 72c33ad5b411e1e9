//! Tests of the labeller on hand-made rows.

use super::*;
use crate::encode::CharSpans;
use crate::policy::{fit_length, Overflow, Tokenized};
use crate::spans::FieldKind;

fn span(message: usize, kind: FieldKind, start: usize, end: usize) -> FieldSpan {
    FieldSpan {
        message,
        kind,
        start,
        end,
    }
}

#[test]
fn ranges_subtract_and_merge() {
    assert_eq!(
        normalize(vec![(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]),
        vec![(0, 3), (5, 9)]
    );
    assert_eq!(
        subtract(&[(0, 10)], &[(2, 4), (6, 8)]),
        vec![(0, 2), (4, 6), (8, 10)]
    );
    assert_eq!(subtract(&[(0, 3), (5, 9)], &[(0, 6)]), vec![(6, 9)]);
}

/// "U: hi<E>A: ok<E>" with one token per character, `<E>` a special token at 5 and 11.
fn row_fixture() -> (Vec<u32>, CharSpans, Vec<FieldSpan>, Vec<MessageInfo>) {
    let text = "U: hi#A: ok#";
    let ids: Vec<u32> = text
        .chars()
        .map(|c| if c == '#' { 999 } else { c as u32 })
        .collect();
    let pos: Vec<(usize, usize)> = (0..text.len()).map(|i| (i, i + 1)).collect();
    let spans = vec![
        span(0, FieldKind::Content, 3, 5),
        span(1, FieldKind::Content, 9, 11),
    ];
    let info = vec![
        MessageInfo {
            role: Some("user".into()),
            ..Default::default()
        },
        MessageInfo {
            role: Some("assistant".into()),
            ..Default::default()
        },
    ];
    (ids, pos, spans, info)
}

fn run(policy: &Policy, info: &[MessageInfo]) -> (Vec<i64>, Vec<i32>) {
    let (ids, pos, spans, _) = row_fixture();
    let text = "U: hi#A: ok#";
    let row = SpanRow {
        text,
        generation_prompt: Some("A: "),
        opener_ids: &[],
        ids: &ids,
        positions: &pos,
        spans: &spans,
        messages: info,
        content_origin: &[Some(0), Some(0)],
        generation: &[],
    };
    let Labels {
        labels,
        message_index: mi,
        ..
    } = label(&row, policy, None, &|id| id == 999).unwrap();
    (labels, mi)
}

#[test]
fn a_token_merged_across_a_message_start_straddles_it() {
    // "U: hi#A: ok#" with ": o" (characters 7..10) one token: the assistant's region starts
    // after the generation prompt "A: " (at 9), so that token also covers prompt text.
    let text = "U: hi#A: ok#";
    let mut pos: Vec<(usize, usize)> = (0..7).map(|i| (i, i + 1)).collect();
    pos.extend([(7, 10), (10, 11), (11, 12)]);
    let ids: Vec<u32> = pos
        .iter()
        .map(|&(s, _)| if s == 5 || s == 11 { 999 } else { s as u32 })
        .collect();
    let (_, _, spans, info) = row_fixture();
    let row = SpanRow {
        text,
        generation_prompt: Some("A: "),
        opener_ids: &[],
        ids: &ids,
        positions: &pos,
        spans: &spans,
        messages: &info,
        content_origin: &[Some(0), Some(0)],
        generation: &[],
    };
    let out = label(&row, &Policy::default(), None, &|id| id == 999).unwrap();
    assert_eq!(out.message_index, vec![-1, -1, -1, 0, 0, 0, -1, 1, 1, 1]);
    let straddling: Vec<usize> = (0..pos.len()).filter(|&t| out.straddles_start[t]).collect();
    assert_eq!(straddling, vec![7]);
    // One token per character: nothing straddles.
    let (ids, pos, spans, info) = row_fixture();
    let row = SpanRow {
        ids: &ids,
        positions: &pos,
        spans: &spans,
        messages: &info,
        ..row
    };
    let out = label(&row, &Policy::default(), None, &|id| id == 999).unwrap();
    assert!(!out.straddles_start.iter().any(|&s| s));
}

fn trained(labels: &[i64]) -> Vec<usize> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn assistant_content_and_its_end_token() {
    let (_, _, _, info) = row_fixture();
    let (labels, mi) = run(&Policy::default(), &info);
    assert_eq!(trained(&labels), vec![9, 10, 11]);
    assert_eq!(mi, vec![-1, -1, -1, 0, 0, 0, -1, -1, -1, 1, 1, 1]);
    let none = Policy {
        train_on_eot: EndTokens::None,
        ..Policy::default()
    };
    assert_eq!(trained(&run(&none, &info).0), vec![9, 10]);
    let all = Policy {
        train_on_eot: EndTokens::All,
        ..Policy::default()
    };
    assert_eq!(trained(&run(&all, &info).0), vec![5, 9, 10, 11]);
    let inputs = Policy {
        train_on_inputs: true,
        ..Policy::default()
    };
    assert_eq!(trained(&run(&inputs, &info).0), vec![3, 4, 5, 9, 10, 11]);
}

#[test]
fn per_message_overrides() {
    let (_, _, _, mut info) = row_fixture();
    info[1].training = Some(false);
    info[0].detail = Some(vec![(1, 1, true)]);
    assert_eq!(trained(&run(&Policy::default(), &info).0), vec![4, 5]);
}

#[test]
fn truncate_left_keeps_the_target() {
    let mut out = Tokenized {
        input_ids: (0..10).collect(),
        labels: vec![
            IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 6, 7, IGNORE, IGNORE,
        ],
        message_index: vec![0, 0, 0, 0, 1, 1, 1, 1, 1, -1],
        ..Default::default()
    };
    let policy = Policy {
        max_length: Some(5),
        overflow: Overflow::TruncateLeft,
        ..Policy::default()
    };
    assert!(fit_length(&mut out, &policy).unwrap());
    assert_eq!(out.input_ids, vec![5, 6, 7, 8, 9]);
    let mut short = Tokenized {
        input_ids: vec![0, 1, 2],
        labels: vec![IGNORE, 1, 2],
        message_index: vec![0, 1, 1],
        ..Default::default()
    };
    let tight = Policy {
        max_length: Some(1),
        overflow: Overflow::TruncateLeft,
        ..Policy::default()
    };
    assert!(matches!(
        fit_length(&mut short, &tight),
        Err(Error::TooLong(_))
    ));
    let drop = Policy {
        overflow: Overflow::Drop,
        ..tight
    };
    assert!(!fit_length(&mut short, &drop).unwrap());
}
