//! Exact sequence packing: rows of known lengths into packs of at most `max_length` tokens.
//!
//! [`plan`] decides which piece of which row goes into which pack (no token is touched), and
//! [`gather`] / [`positions`] build the flat buffers from that plan. Both are deterministic:
//! the same lengths and options give the same plan. See `docs/packing.md`.

use std::collections::{BTreeMap, VecDeque};

/// How rows are assigned to packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Best-fit decreasing: longest first, each into the fullest pack it fits (O(n log L)).
    Bfd,
    /// First-fit decreasing: longest first, each into the oldest pack it fits (O(n log n)).
    Ffd,
    /// Input order; a pack is closed as soon as the next row does not fit.
    Sequential,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "bfd" => Ok(Strategy::Bfd),
            "ffd" => Ok(Strategy::Ffd),
            "sequential" => Ok(Strategy::Sequential),
            other => Err(format!(
                "strategy must be 'bfd', 'ffd' or 'sequential', not {other:?}"
            )),
        }
    }
}

/// What happens to a row longer than `max_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Long {
    Error,
    Drop,
    TruncateLeft,
    TruncateRight,
    /// Cut into pieces of `max_length` (the last one shorter), each its own packed sequence.
    Split,
}

impl Long {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Long::Error),
            "drop" => Ok(Long::Drop),
            "truncate_left" => Ok(Long::TruncateLeft),
            "truncate_right" => Ok(Long::TruncateRight),
            "split" => Ok(Long::Split),
            other => Err(format!(
                "overflow must be 'error', 'drop', 'truncate_left', 'truncate_right' or 'split', not {other:?}"
            )),
        }
    }
}

/// A contiguous run of one row's tokens: `len` tokens from `start` (an offset into the flat buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub row: usize,
    pub start: u64,
    pub len: u64,
}

/// The packs: pack `p` holds `pieces[pack_offsets[p]..pack_offsets[p+1]]`, in input order.
#[derive(Debug, Default)]
pub struct Plan {
    pub pieces: Vec<Piece>,
    pub pack_offsets: Vec<u64>,
    /// Rows (indices into the batch) removed, shortened, or split by the overflow rule.
    pub dropped: Vec<usize>,
    pub truncated: Vec<usize>,
    pub split: Vec<usize>,
}

/// A row the plan refuses: its index in the batch and why.
#[derive(Debug, PartialEq, Eq)]
pub struct RowError {
    pub row: usize,
    pub reason: String,
}

/// Rows `offsets[i]..offsets[i+1]` into packs. `label_offsets` must equal `offsets` row by row
/// (labels that do not run along the tokens cannot be packed).
pub fn plan(
    offsets: &[u64],
    label_offsets: &[u64],
    max_length: u64,
    strategy: Strategy,
    long: Long,
) -> Result<Plan, RowError> {
    let mut out = Plan::default();
    let pieces = cut_rows(offsets, label_offsets, max_length, long, &mut out)?;
    let lengths: Vec<u64> = pieces.iter().map(|p| p.len).collect();
    let bins = match strategy {
        Strategy::Bfd => assign_bfd(&lengths, max_length),
        Strategy::Ffd => assign_ffd(&lengths, max_length),
        Strategy::Sequential => assign_sequential(&lengths, max_length),
    };
    // Packs in order of their first piece (input order); pieces within a pack in input order.
    let n_bins = bins.iter().map(|&b| b + 1).max().unwrap_or(0);
    let mut counts = vec![0u64; n_bins];
    let mut first = vec![usize::MAX; n_bins];
    for (i, &b) in bins.iter().enumerate() {
        counts[b] += 1;
        first[b] = first[b].min(i);
    }
    let mut order: Vec<usize> = (0..n_bins).collect();
    order.sort_by_key(|&b| first[b]);
    let mut rank = vec![0usize; n_bins];
    for (r, &b) in order.iter().enumerate() {
        rank[b] = r;
    }
    let mut starts = vec![0u64; n_bins + 1];
    for (r, &b) in order.iter().enumerate() {
        starts[r + 1] = starts[r] + counts[b];
    }
    let mut fill = starts.clone();
    let mut placed = vec![
        Piece {
            row: 0,
            start: 0,
            len: 0
        };
        pieces.len()
    ];
    for (i, &b) in bins.iter().enumerate() {
        let r = rank[b];
        placed[fill[r] as usize] = pieces[i];
        fill[r] += 1;
    }
    out.pieces = placed;
    out.pack_offsets = starts;
    Ok(out)
}

/// Every row as one piece, or (longer than `max_length`) cut, dropped or split by `long`.
fn cut_rows(
    offsets: &[u64],
    label_offsets: &[u64],
    max_length: u64,
    long: Long,
    out: &mut Plan,
) -> Result<Vec<Piece>, RowError> {
    if max_length == 0 {
        return Err(RowError {
            row: 0,
            reason: "max_length must be at least 1".into(),
        });
    }
    if offsets.len() != label_offsets.len() {
        return Err(RowError {
            row: 0,
            reason: format!(
                "{} offsets but {} label offsets",
                offsets.len(),
                label_offsets.len()
            ),
        });
    }
    let mut pieces = Vec::with_capacity(offsets.len().saturating_sub(1));
    for row in 0..offsets.len().saturating_sub(1) {
        let (start, end) = (offsets[row], offsets[row + 1]);
        if end < start || label_offsets[row] != start || label_offsets[row + 1] != end {
            return Err(RowError {
                row,
                reason: format!(
                    "its labels ({} of them) do not run along its {} tokens; such a row cannot be packed",
                    label_offsets[row + 1].wrapping_sub(label_offsets[row]),
                    end.wrapping_sub(start)
                ),
            });
        }
        let len = end - start;
        if len == 0 {
            return Err(RowError {
                row,
                reason: "it has no tokens".into(),
            });
        }
        if len <= max_length {
            pieces.push(Piece { row, start, len });
            continue;
        }
        match long {
            Long::Error => {
                return Err(RowError {
                    row,
                    reason: format!(
                        "{len} tokens is longer than max_length {max_length} (overflow='error')"
                    ),
                })
            }
            Long::Drop => out.dropped.push(row),
            Long::TruncateRight => {
                out.truncated.push(row);
                pieces.push(Piece {
                    row,
                    start,
                    len: max_length,
                });
            }
            Long::TruncateLeft => {
                out.truncated.push(row);
                pieces.push(Piece {
                    row,
                    start: end - max_length,
                    len: max_length,
                });
            }
            Long::Split => {
                out.split.push(row);
                let mut s = start;
                while s < end {
                    let n = (end - s).min(max_length);
                    pieces.push(Piece {
                        row,
                        start: s,
                        len: n,
                    });
                    s += n;
                }
            }
        }
    }
    Ok(pieces)
}

/// Piece indices, longest first; equal lengths keep input order (the sort is stable).
fn decreasing(lengths: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    order
}

/// Best fit: the pack with the least room that still fits. Packs are kept in an ordered map
/// keyed by remaining room (at most `max_length + 1` keys, so each step is O(log L)); among packs
/// with equal room the oldest is taken (FIFO), which makes the plan deterministic.
pub fn assign_bfd(lengths: &[u64], max_length: u64) -> Vec<usize> {
    let mut bins = vec![0usize; lengths.len()];
    let mut room: BTreeMap<u64, VecDeque<usize>> = BTreeMap::new();
    let mut n_bins = 0usize;
    for i in decreasing(lengths) {
        let len = lengths[i];
        let found = room
            .range_mut(len..)
            .next()
            .map(|(&r, q)| (r, q.pop_front()));
        let (bin, left) = match found {
            Some((r, Some(b))) => {
                if room.get(&r).is_some_and(VecDeque::is_empty) {
                    room.remove(&r);
                }
                (b, r - len)
            }
            _ => {
                n_bins += 1;
                (n_bins - 1, max_length - len)
            }
        };
        bins[i] = bin;
        if left > 0 {
            room.entry(left).or_default().push_back(bin);
        }
    }
    bins
}

/// First fit: the oldest pack that fits, found in a segment tree of the packs' remaining room
/// (leaves not yet opened hold `max_length`, so "no open pack fits" lands on the next new one).
pub fn assign_ffd(lengths: &[u64], max_length: u64) -> Vec<usize> {
    let n = lengths.len();
    let mut bins = vec![0usize; n];
    if n == 0 {
        return bins;
    }
    let size = n.next_power_of_two();
    let mut tree = vec![max_length; 2 * size];
    for i in decreasing(lengths) {
        let len = lengths[i];
        let mut node = 1;
        while node < size {
            node = if tree[2 * node] >= len {
                2 * node
            } else {
                2 * node + 1
            };
        }
        bins[i] = node - size;
        tree[node] -= len;
        node /= 2;
        while node >= 1 {
            tree[node] = tree[2 * node].max(tree[2 * node + 1]);
            node /= 2;
        }
    }
    bins
}

/// Input order: a new pack whenever the next piece does not fit the current one.
pub fn assign_sequential(lengths: &[u64], max_length: u64) -> Vec<usize> {
    let mut bins = Vec::with_capacity(lengths.len());
    let (mut bin, mut used) = (0usize, 0u64);
    for (i, &len) in lengths.iter().enumerate() {
        if i > 0 && used + len > max_length {
            bin += 1;
            used = 0;
        }
        used += len;
        bins.push(bin);
    }
    bins
}

/// One flat buffer from `src` along the plan. `first` (labels: -100) replaces each packed
/// sequence's first value; `pad` (when `Some`) fills every pack up to `max_length`.
pub fn gather<T: Copy>(
    src: &[T],
    plan: &Plan,
    max_length: u64,
    pad: Option<T>,
    first: Option<T>,
) -> Vec<T> {
    let total: u64 = if pad.is_some() {
        max_length * (plan.pack_offsets.len().saturating_sub(1)) as u64
    } else {
        plan.pieces.iter().map(|p| p.len).sum()
    };
    let mut out = Vec::with_capacity(total as usize);
    for w in plan.pack_offsets.windows(2) {
        let mut used = 0u64;
        for p in &plan.pieces[w[0] as usize..w[1] as usize] {
            let at = out.len();
            out.extend_from_slice(&src[p.start as usize..(p.start + p.len) as usize]);
            if let Some(f) = first {
                out[at] = f;
            }
            used += p.len;
        }
        if let Some(v) = pad {
            out.resize(out.len() + (max_length - used) as usize, v);
        }
    }
    out
}

/// `position_ids`: 0..len-1 in every packed sequence. With `pad`, the padding continues the
/// last sequence's count, capped at `max_length - 1` (torchtune's `PackedDataset._pad_pack`).
pub fn positions(plan: &Plan, max_length: u64, pad: bool) -> Vec<i64> {
    let mut out = Vec::new();
    for w in plan.pack_offsets.windows(2) {
        let mut used = 0u64;
        let mut next = 0i64;
        for p in &plan.pieces[w[0] as usize..w[1] as usize] {
            out.extend(0..p.len as i64);
            next = p.len as i64;
            used += p.len;
        }
        if pad {
            let cap = max_length as i64 - 1;
            out.extend((0..(max_length - used) as i64).map(|k| (next + k).min(cap)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(lengths: &[u64]) -> Vec<u64> {
        let mut o = vec![0];
        for l in lengths {
            o.push(o.last().unwrap() + l);
        }
        o
    }

    #[test]
    fn bfd_takes_the_fullest_pack_that_fits() {
        // 8 opens A (room 2), 6 opens B (4), 3 goes to B (1); 1 fits both: best fit is B
        // (room 1), first fit is A (the older).
        assert_eq!(assign_bfd(&[8, 6, 3, 1], 10), vec![0, 1, 1, 1]);
        assert_eq!(assign_ffd(&[8, 6, 3, 1], 10), vec![0, 1, 1, 0]);
    }

    #[test]
    fn sequential_keeps_order() {
        assert_eq!(assign_sequential(&[3, 3, 5, 1, 9], 10), vec![0, 0, 1, 1, 2]);
    }

    #[test]
    fn split_and_labels() {
        let o = offsets(&[2, 7, 3]);
        let plan = plan(&o, &o, 4, Strategy::Sequential, Long::Split).unwrap();
        assert_eq!(plan.split, vec![1]);
        let lens: Vec<u64> = plan.pieces.iter().map(|p| p.len).collect();
        assert_eq!(lens, vec![2, 4, 3, 3]);
        let src: Vec<i64> = (0..12).collect();
        let labels = gather(&src, &plan, 4, Some(-1), Some(-100));
        assert_eq!(
            labels,
            vec![-100, 1, -1, -1, -100, 3, 4, 5, -100, 7, 8, -1, -100, 10, 11, -1]
        );
        assert_eq!(
            positions(&plan, 4, true),
            vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
        );
    }

    #[test]
    fn overflow_error_names_the_row() {
        let o = offsets(&[2, 7]);
        let err = plan(&o, &o, 4, Strategy::Bfd, Long::Error).unwrap_err();
        assert_eq!(err.row, 1);
    }
}
