//! Character-range algebra for the labeller: sorted, non-overlapping `(start, end)` ranges in
//! code points.

/// Sorted, non-overlapping character ranges.
pub(super) fn normalize(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` minus `b` (both normalized).
pub(super) fn subtract(a: &[(usize, usize)], b: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Index of the first range ending after `c`.
fn first_ending_after(ranges: &[(usize, usize)], c: usize) -> usize {
    ranges.partition_point(|&(_, e)| e <= c)
}

pub(super) fn overlaps(ranges: &[(usize, usize)], (ts, te): (usize, usize)) -> bool {
    let i = first_ending_after(ranges, ts);
    ranges.get(i).is_some_and(|&(s, _)| s < te)
}

pub(super) fn inside(ranges: &[(usize, usize)], (ts, te): (usize, usize)) -> bool {
    let i = first_ending_after(ranges, ts);
    ranges.get(i).is_some_and(|&(s, e)| s <= ts && te <= e)
}
