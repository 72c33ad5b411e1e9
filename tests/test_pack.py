"""chatmask.pack: conservation on the fixture corpus, properties on random lengths, trainer formats.

Conservation is checked element by element against the TokenizedBatch the packs were made from:
every token, label and message index of every input row is found exactly once, in order, in one
packed sequence (the first label of each packed sequence is -100, the one documented change), and
position_ids count 0..len-1 in each. CI checks the first rows of every conversation file; ``-m slow``
all of them. Counts are printed (run with -s).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
from _parity import TOKENIZERS_DIR, conversation_files
from conftest import IN_CI, fixture_names, require_shared
from hypothesis import given, settings
from hypothesis import strategies as st

import chatmask
from chatmask import ChatTokenizer, MaskPolicy, PackedBatch, TokenizedBatch, _core, pack
from chatmask.pack import batch_from_lists

CI_ROWS = 40
STRATEGIES = ("bfd", "ffd", "sequential")


@lru_cache(maxsize=None)
def corpus(limit: int | None, mode: str = "policy", name: str = "qwen3") -> TokenizedBatch:
    """The fixture conversations (first `limit` rows of each file) tokenized in one batch."""
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    rows = []
    for path in conversation_files():
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()][:limit]
    if mode == "policy":
        return tok.tokenize_batch(rows, policy=MaskPolicy(), on_error="skip")
    return tok.tokenize_batch(rows, mode=mode, on_error="skip")


def conservation(batch: TokenizedBatch, packed: PackedBatch, overflow: str) -> tuple[int, list[str]]:
    """(values compared, differences) between the packs and the rows they came from."""
    diffs: list[str] = []
    compared = 0
    L = packed.max_length
    index_of = {int(r): i for i, r in enumerate(batch.rows)}
    covered: dict[int, list[tuple[int, int]]] = {}
    for p in range(len(packed)):
        item = packed[p]
        lens = item["seq_lens"]
        if int(lens.sum()) != len(item["input_ids"]) or len(item["input_ids"]) > L:
            diffs.append(f"pack {p}: {len(item['input_ids'])} tokens, seq_lens sum {int(lens.sum())}, max {L}")
        if packed.padded and len(item["input_ids"]) != L:
            diffs.append(f"pack {p}: padded to {len(item['input_ids'])}, not {L}")
        at = 0
        for k in range(packed.pack_offsets[p], packed.pack_offsets[p + 1]):
            n, row, off = int(packed.seq_lens[k]), int(packed.sequence_rows[k]), int(packed.sequence_offsets[k])
            ids, labels, pos = (item[f][at : at + n] for f in ("input_ids", "labels", "position_ids"))
            at += n
            if row < 0:  # padding: pad id, labels -100, positions continuing capped at L-1
                compared += 3 * n
                want_pos = np.minimum(
                    np.arange(n) + (int(item["position_ids"][at - n - 1]) + 1 if at > n else 0), L - 1
                )
                if (ids != 0).any() or (labels != -100).any() or (pos != want_pos).any():
                    diffs.append(f"pack {p}: padding wrong")
                continue
            i = index_of[row]
            src = batch[i]
            want_ids = src["input_ids"][off : off + n]
            want_labels = src["labels"][off : off + n].copy()
            want_labels[0] = -100
            compared += 3 * n
            if len(want_ids) != n or not np.array_equal(ids, want_ids):
                diffs.append(f"row {row}: tokens differ in pack {p}")
            if not np.array_equal(labels, want_labels):
                diffs.append(f"row {row}: labels differ in pack {p}")
            if not np.array_equal(pos, np.arange(n)):
                diffs.append(f"row {row}: position_ids differ in pack {p}")
            if packed.message_index is not None:
                compared += n
                if not np.array_equal(item["message_index"][at - n : at], src["message_index"][off : off + n]):
                    diffs.append(f"row {row}: message_index differs in pack {p}")
            covered.setdefault(row, []).append((off, n))
    # Exactly once: each row's pieces tile the kept window with no gap or overlap.
    dropped, cut = set(packed.rows_dropped), set(packed.rows_truncated)
    for i, row in enumerate(batch.rows.tolist()):
        length = int(batch.offsets[i + 1] - batch.offsets[i])
        pieces = sorted(covered.get(row, []))
        if row in dropped:
            if pieces or length <= L:
                diffs.append(f"row {row}: dropped wrongly")
            continue
        if row in cut:
            start = length - L if overflow == "truncate_left" else 0
            want = [(start, L)]
        elif length > L:
            want = [(s, min(L, length - s)) for s in range(0, length, L)]
        else:
            want = [(0, length)]
        if pieces != want:
            diffs.append(f"row {row}: pieces {pieces[:3]} != {want[:3]}")
    if len(packed.rows_split) != sum(
        1 for i in range(len(batch)) if overflow == "split" and batch.offsets[i + 1] - batch.offsets[i] > L
    ):
        diffs.append("rows_split miscounted")
    return compared, diffs


CASES = [
    (s, o, L, pad)
    for s in STRATEGIES
    for o, L in (("error", 0), ("drop", 512), ("truncate_left", 512), ("truncate_right", 512), ("split", 512))
    for pad in (False, True)
]


def _check_corpus(limit: int | None, name: str = "qwen3") -> None:
    batch = corpus(limit, name=name)
    assert len(batch) > 100
    total_compared = 0
    longest = int(np.diff(batch.offsets).max())
    for strategy, overflow, L, pad in CASES:
        L = L or longest  # overflow="error" needs every row to fit
        packed = pack(batch, L, strategy=strategy, overflow=overflow, pad_to_max_length=pad)
        compared, diffs = conservation(batch, packed, overflow)
        total_compared += compared
        assert diffs == [], (strategy, overflow, L, pad, diffs[:5])
        assert compared > 0
        if overflow in ("drop", "truncate_left", "truncate_right", "split"):
            # max_length 512 is below the longest fixture rows: the overflow rule really ran.
            assert packed.rows_dropped or packed.rows_truncated or packed.rows_split
    print(
        f"\npack conservation ({name}): {len(batch)} rows, {len(CASES)} strategy x option cases, {total_compared} values compared, 0 differences"
    )


def test_conservation_fixture_subset():
    _check_corpus(CI_ROWS)


def test_overflow_error_names_the_fixture_row():
    batch = corpus(CI_ROWS)
    lens = np.diff(batch.offsets)
    longest = int(np.argmax(lens))
    with pytest.raises(ValueError, match=rf"^row {int(batch.rows[longest])}: {int(lens[longest])} tokens is longer"):
        pack(batch, int(lens[longest]) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", fixture_names())
def test_conservation_whole_corpus(name):
    _check_corpus(None, name)


def test_reference_mode_batches_pack():
    batch = corpus(CI_ROWS, mode="last")
    same = np.array_equal(batch.offsets, batch.label_offsets)
    if not same:  # a row whose labels do not run along its tokens is refused, naming it
        with pytest.raises(ValueError, match=r"^row \d+: its labels"):
            pack(batch, 8192, overflow="split")
        return
    packed = pack(batch, 8192, strategy="ffd", overflow="split")
    compared, diffs = conservation(batch, packed, "split")
    assert diffs == [] and compared > 0


def test_bfd_fills_99_percent_on_the_fixture_corpus():
    batch = corpus(None)
    lens = np.diff(batch.offsets)
    for L in (4096, 8192):
        # split: the few very long rows become full packs (which flatters the figure a little);
        # truncate_right: what TRL's bfd does with them. Both must reach 99%.
        for overflow in ("split", "truncate_right"):
            packed = pack(batch, L, overflow=overflow)
            total = int(lens.sum()) if overflow == "split" else int(np.minimum(lens, L).sum())
            print(
                f"\nbfd at {L} ({overflow}): {len(packed)} packs (lower bound {-(-total // L)}), efficiency {packed.efficiency:.4%}"
            )
            assert packed.efficiency >= 0.99
            assert packed.tokens == total


# -- properties on random lengths ---------------------------------------------------------


def _reference_assign(lengths: list[int], L: int, strategy: str) -> list[int]:
    """Plain O(n^2) statements of the three rules, with the core's tie-breaking: longest first
    (stable); bfd takes the least room that fits, among equal rooms the pack that reached it first;
    ffd the oldest pack that fits; sequential a new pack when the next piece does not fit."""
    bins = [0] * len(lengths)
    if strategy == "sequential":
        b = used = 0
        for i, n in enumerate(lengths):
            if i and used + n > L:
                b, used = b + 1, 0
            used += n
            bins[i] = b
        return bins
    room: list[int] = []
    stamp: list[int] = []
    for t, i in enumerate(sorted(range(len(lengths)), key=lambda i: -lengths[i])):
        n = lengths[i]
        fits = [b for b in range(len(room)) if room[b] >= n and room[b] > 0]
        if strategy == "bfd":
            fits.sort(key=lambda b: (room[b], stamp[b]))
        if fits:
            b = fits[0]
        else:
            room.append(L)
            stamp.append(t)
            b = len(room) - 1
        room[b] -= n
        stamp[b] = t
        bins[i] = b
    return bins


def _packs_of(bins: list[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(bins):
        groups.setdefault(b, []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


lengths_strategy = st.integers(1, 64).flatmap(
    lambda L: st.tuples(st.just(L), st.lists(st.integers(1, L), max_size=120))
)


@settings(max_examples=150, deadline=None)
@given(lengths_strategy, st.sampled_from(STRATEGIES))
def test_pack_properties(case, strategy):
    L, lengths = case
    batch = batch_from_lists([list(range(n)) for n in lengths], [[7] * n for n in lengths])
    packed = pack(batch, L, strategy=strategy)
    fills = [int(packed.pack_seq_lens(p).sum()) for p in range(len(packed))]
    assert all(f <= L for f in fills)
    assert sum(fills) == sum(lengths) == packed.tokens
    assert packed.efficiency == (sum(lengths) / (len(packed) * L) if lengths else 1.0)
    assert len(packed) >= -(-sum(lengths) // L)
    if strategy in ("bfd", "ffd"):
        assert sum(1 for f in fills if 2 * f <= L) <= 1
    else:
        assert all(a + b > L for a, b in zip(fills, fills[1:]))
    # The same packs as the plain statement of the rule (so also deterministic).
    want = _packs_of(_reference_assign(lengths, L, strategy))
    got = [
        packed.sequence_rows[packed.pack_offsets[p] : packed.pack_offsets[p + 1]].tolist() for p in range(len(packed))
    ]
    assert got == want
    again = pack(batch, L, strategy=strategy)
    assert np.array_equal(again.input_ids, packed.input_ids) and np.array_equal(again.seq_lens, packed.seq_lens)


@settings(max_examples=60, deadline=None)
@given(lengths_strategy, st.sampled_from(STRATEGIES))
def test_padded_efficiency_counts_no_padding(case, strategy):
    L, lengths = case
    batch = batch_from_lists([[1] * n for n in lengths], [[1] * n for n in lengths])
    packed = pack(batch, L, strategy=strategy, pad_to_max_length=True)
    assert len(packed.input_ids) == len(packed) * L
    assert packed.tokens == sum(lengths)
    assert int((packed.labels != -100).sum()) == sum(n - 1 for n in lengths)


def test_bfd_and_ffd_differ_and_neither_dominates():
    # bfd puts the 1 with the 3 (room 1); ffd into the oldest pack (room 2).
    batch = batch_from_lists([[0] * n for n in (8, 6, 3, 1)], [[0] * n for n in (8, 6, 3, 1)])
    b, f = pack(batch, 10, strategy="bfd"), pack(batch, 10, strategy="ffd")
    assert b.pack_seq_lens(1).tolist() == [6, 3, 1] and f.pack_seq_lens(0).tolist() == [8, 1]


# -- bad input -----------------------------------------------------------------------------


def test_bad_input_is_a_clear_exception():
    batch = batch_from_lists([[1, 2, 3], [4] * 9], [[1, 2, 3], [4] * 9], rows=[10, 11])
    with pytest.raises(ValueError, match=r"^row 11: 9 tokens is longer than max_length 4 \(overflow='error'\)"):
        pack(batch, 4)
    with pytest.raises(ValueError, match="strategy"):
        pack(batch, 4, strategy="best")
    with pytest.raises(ValueError, match="overflow"):
        pack(batch, 4, overflow="cut")
    with pytest.raises(ValueError, match="max_length"):
        pack(batch, 0)
    with pytest.raises(TypeError, match="TokenizedBatch"):
        pack([[1, 2]], 4)  # type: ignore[arg-type]
    empty = batch_from_lists([[1], []], [[1], []], rows=[3, 4])
    with pytest.raises(ValueError, match="^row 4: it has no tokens"):
        pack(empty, 4)
    odd = batch_from_lists([[1, 2]], [[1, 2, 3]], rows=[5])
    with pytest.raises(ValueError, match="^row 5: its labels"):
        pack(odd, 4)
    plan = _core.pack_plan(
        np.array([0, 2], np.int64), np.array([0, 2], np.int64), np.array([0], np.int64), 4, "bfd", "error"
    )
    with pytest.raises(ValueError, match="exceeds max_length"):
        _core.pack_gather(np.arange(2, dtype=np.int64), plan["piece_start"], plan["piece_len"], plan["pack_offsets"], 1)
    with pytest.raises(ValueError, match="outside"):
        _core.pack_gather(np.arange(1, dtype=np.int64), plan["piece_start"], plan["piece_len"], plan["pack_offsets"], 4)
    with pytest.raises(TypeError, match="int32, uint32 or int64"):
        _core.pack_gather(
            np.arange(2, dtype=np.float64), plan["piece_start"], plan["piece_len"], plan["pack_offsets"], 4
        )


def test_empty_batch():
    packed = pack(batch_from_lists([], []), 16, pad_to_max_length=True)
    assert len(packed) == 0 and packed.efficiency == 1.0 and len(packed.input_ids) == 0


# -- trainer formats -----------------------------------------------------------------------


def test_positions_and_cu_seq_lens_equal_data_collator_with_flattening():
    """transformers' own ``DataCollatorWithFlattening`` (installed here; ``return_tensors="np"``
    needs no torch) on the sequences of each pack. Its rule, for each feature::

        batch["labels"] += [separator_id] + labels[1:]
        batch["position_ids"] += [self.position_ids_start + i for i in range(len(input_ids))]
        cu_seq_lens.append(cu_seq_lens[-1] + len(input_ids))

    so its labels also carry -100 at each sequence's first token: all fields must be equal."""
    try:
        import transformers
    except ImportError:  # it is in the test extra: under CI=true a missing one fails
        if IN_CI:
            raise
        pytest.skip("transformers is not installed")
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="np")
    batch = corpus(CI_ROWS)
    packed = pack(batch, 4096, strategy="bfd", overflow="split")
    index_of = {int(r): i for i, r in enumerate(batch.rows)}
    compared = 0
    for p in range(len(packed)):
        k0, k1 = packed.pack_offsets[p], packed.pack_offsets[p + 1]
        features = []
        for k in range(k0, k1):  # the packed sequences (pieces of split rows included) as features
            row, off, n = int(packed.sequence_rows[k]), int(packed.sequence_offsets[k]), int(packed.seq_lens[k])
            src = batch[index_of[row]]
            features.append(
                {"input_ids": src["input_ids"][off : off + n].tolist(), "labels": src["labels"][off : off + n].tolist()}
            )
        theirs = collator(features)
        ours = packed[p]
        kwargs = packed.flash_attn_kwargs(p)
        for name in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(np.asarray(theirs[name]).reshape(-1), ours[name]), (p, name)
            compared += len(ours[name])
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
            assert np.array_equal(np.asarray(theirs[name]), kwargs[name]), (p, name)
        assert theirs["max_length_q"] == kwargs["max_length_q"]
    assert compared > 0
    print(f"\nDataCollatorWithFlattening: {len(packed)} packs, {compared} values equal")


def _torchtune_packed_dataset(samples: list[dict[str, list[int]]], max_seq_len: int, padding_idx: int) -> list[dict]:
    """A faithful numpy restatement of torchtune's ``PackedDataset`` (``torchtune/datasets/_packed.py``,
    ``split_across_pack=False``), which needs torch. The upstream lines followed::

        current_pack["tokens"] += tokens
        current_pack["labels"] += labels
        current_pack["input_pos"] += [x % self.max_seq_len for x in range(seq_len)]
        current_pack["seq_lens"] += [seq_len]
        while len(current_pack["tokens"]) > self.max_seq_len ...:
            current_pack = self._split_and_add_pack(current_pack)   # boundary = previous_sample_boundary
        ...
        # _pad_pack
        num_padding_tokens = self.max_seq_len - len(pack["tokens"])
        padded_tokens = F.pad(pack["tokens"], (0, num_padding_tokens), value=padding_idx)
        padded_labels = F.pad(pack["labels"], (0, ...), value=CROSS_ENTROPY_IGNORE_IDX)
        padded_seq_lens = torch.cat([pack["seq_lens"], torch.tensor([num_padding_tokens])])
            if num_padding_tokens > 0 else pack["seq_lens"]
        num_range = torch.arange(pack["input_pos"][-1] + 1,
                                 pack["input_pos"][-1] + self.max_seq_len - len(pack["input_pos"]) + 1)
        clamped_num_range = torch.clamp(num_range, 0, self.max_seq_len - 1)
    """
    packs: list[dict] = []
    cur: dict[str, list[int]] = {"tokens": [], "labels": [], "input_pos": [], "seq_lens": []}
    boundary = 0

    def add(p: dict[str, list[int]]) -> None:
        pad = max_seq_len - len(p["tokens"])
        last = p["input_pos"][-1]
        packs.append(
            {
                "tokens": np.array(p["tokens"] + [padding_idx] * pad),
                "labels": np.array(p["labels"] + [-100] * pad),
                "input_pos": np.concatenate(
                    [p["input_pos"], np.clip(np.arange(last + 1, last + pad + 1), 0, max_seq_len - 1)]
                ),
                "seq_lens": np.array(p["seq_lens"] + ([pad] if pad > 0 else [])),
            }
        )

    for s in samples:
        n = len(s["tokens"])
        cur["tokens"] += s["tokens"]
        cur["labels"] += s["labels"]
        cur["input_pos"] += [x % max_seq_len for x in range(n)]
        cur["seq_lens"] += [n]
        while len(cur["tokens"]) > max_seq_len:
            add({k: (v[:boundary] if k != "seq_lens" else v[:-1]) for k, v in cur.items()})
            cur = {k: (v[boundary:] if k != "seq_lens" else [v[-1]]) for k, v in cur.items()}
        boundary = len(cur["tokens"])
    if cur["tokens"]:
        add(cur)
    return packs


def test_sequential_padded_equals_torchtune_packed_dataset():
    """``strategy="sequential", pad_to_max_length=True`` against the torchtune rule above: tokens,
    input_pos and seq_lens equal; labels equal except the first label of each sequence (-100 here,
    left as is by torchtune, whose recipes shift labels themselves)."""
    full = corpus(CI_ROWS)
    L = 4096
    fit = [i for i in range(len(full)) if len(full[i]["input_ids"]) <= L]  # torchtune raises on longer rows
    batch = batch_from_lists([full[i]["input_ids"] for i in fit], [full[i]["labels"] for i in fit])
    samples = [
        {"tokens": batch[i]["input_ids"].tolist(), "labels": batch[i]["labels"].tolist()} for i in range(len(batch))
    ]
    theirs = _torchtune_packed_dataset(samples, L, padding_idx=0)
    packed = pack(batch, L, strategy="sequential", pad_to_max_length=True, pad_id=0)
    assert len(theirs) == len(packed)
    compared = 0
    for p, t in enumerate(theirs):
        ours = packed.torchtune(p)
        for name in ("tokens", "input_pos", "seq_lens"):
            assert np.array_equal(ours[name], t[name]), (p, name)
            compared += len(ours[name])
        starts = np.concatenate([[0], np.cumsum(t["seq_lens"])[:-1]])
        real = packed.sequence_rows[packed.pack_offsets[p] : packed.pack_offsets[p + 1]] >= 0
        want = t["labels"].copy()
        want[starts[real]] = -100
        assert np.array_equal(ours["labels"], want), p
        compared += len(want)
    print(f"\ntorchtune PackedDataset rule: {len(theirs)} packs, {compared} values equal")


def test_trl_padding_free_position_ids():
    """TRL's collator builds position_ids from ``seq_lengths`` (``trl/trainer/sft_trainer.py``,
    ``get_position_ids_from_packed_seq_lengths``)::

        position_ids = torch.ones(sum(example_lengths), dtype=batch_seq_lengths.dtype)
        position_ids[0] = 0
        position_ids[batch_seq_lengths[:-1].cumsum(0)] = -(batch_seq_lengths[:-1] - 1)
        position_ids = position_ids.cumsum(0)

    restated in numpy (TRL needs torch); then ``labels[position_ids == 0] = -100`` must change nothing."""
    batch = corpus(CI_ROWS)
    packed = pack(batch, 2048, overflow="split")
    for p in range(len(packed)):
        lens = packed.pack_seq_lens(p).astype(np.int64)
        pos = np.ones(int(lens.sum()), np.int64)
        pos[0] = 0
        pos[np.cumsum(lens[:-1])] = -(lens[:-1] - 1)
        pos = np.cumsum(pos)
        assert np.array_equal(pos, packed[p]["position_ids"])
        labels = packed[p]["labels"].copy()
        labels[pos == 0] = -100
        assert np.array_equal(labels, packed[p]["labels"])


def test_attention_mask_is_one_based_sequence_index():
    batch = batch_from_lists([[1] * 3, [2] * 2], [[1] * 3, [2] * 2])
    packed = pack(batch, 8, strategy="sequential", pad_to_max_length=True)
    assert packed.attention_mask(0).tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert packed.cu_seqlens(0).tolist() == [0, 3, 5, 8]
    assert packed.pack_seq_lens(0).tolist() == [3, 2, 3]
    assert packed.sequence_rows.tolist() == [0, 1, -1]
    assert packed[0]["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert packed[0]["labels"].tolist() == [-100, 1, 1, -100, 2, -100, -100, -100]
    table = packed.to_arrow()
    assert table.column("seq_lens").to_pylist() == [[3, 2, 3]]
    assert chatmask.pack is pack
