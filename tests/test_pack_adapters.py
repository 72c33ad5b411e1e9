"""The packing steps of the adapters, for real: `datasets` ``map(pack_fn(...))`` and Ray Data
``map_batches(PackBatch)`` on tokenized demo rows. Every input row must come out as exactly one
packed sequence (as a multiset: tokens, labels with the first one -100, message_index), packs stay
within max_length, and the efficiency lost at batch / block edges is printed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import need

import chatmask
from chatmask.demo import demo_conversations, demo_tokenizer

TOK = demo_tokenizer()
MAX = 256


def tokenized(n: int) -> chatmask.TokenizedBatch:
    rows = [r for _ in range(n // len(demo_conversations()) + 1) for r in demo_conversations()][:n]
    return TOK.tokenize_batch(rows, policy=chatmask.MaskPolicy(), on_error="skip")


def columns(batch: chatmask.TokenizedBatch) -> dict[str, list[list[int]]]:
    return {
        "input_ids": [batch[i]["input_ids"].tolist() for i in range(len(batch))],
        "labels": [batch[i]["labels"].tolist() for i in range(len(batch))],
        "message_index": [batch[i]["message_index"].tolist() for i in range(len(batch))],
    }


def expected(batch: chatmask.TokenizedBatch) -> Counter:
    out: Counter = Counter()
    for i in range(len(batch)):
        row = batch[i]
        labels = row["labels"].tolist()
        labels[0] = -100
        out[(tuple(row["input_ids"].tolist()), tuple(labels), tuple(row["message_index"].tolist()))] += 1
    return out


def sequences(packs: list[dict[str, list[int]]]) -> tuple[Counter, int, int]:
    """(multiset of packed sequences, tokens, packs), checking every pack on the way."""
    got: Counter = Counter()
    tokens = 0
    for p in packs:
        assert len(p["input_ids"]) <= MAX and sum(p["seq_lens"]) == len(p["input_ids"])
        at = 0
        for n in p["seq_lens"]:
            assert list(p["position_ids"][at : at + n]) == list(range(n))
            got[tuple(tuple(p[c][at : at + n]) for c in ("input_ids", "labels", "message_index"))] += 1
            at += n
            tokens += n
    return got, tokens, len(packs)


def test_datasets_pack_map(capsys):
    datasets = need("datasets")
    datasets.disable_progress_bars()
    batch = tokenized(2000)
    ds = datasets.Dataset.from_dict(columns(batch))
    whole = chatmask.pack(batch, MAX)
    for size in (100, 1000):
        fn = chatmask.datasets.pack_fn(MAX)
        out = ds.map(fn, batched=True, batch_size=size, remove_columns=ds.column_names)
        assert sorted(out.column_names) == ["input_ids", "labels", "message_index", "position_ids", "seq_lens"]
        assert len(out) < len(ds)
        got, tokens, packs = sequences(out.to_list())
        assert got == expected(batch)
        with capsys.disabled():
            print(
                f"\ndatasets pack map, batch_size {size}: {packs} packs, efficiency {tokens / (packs * MAX):.4%} "
                f"(one pack call over all rows: {len(whole)} packs, {whole.efficiency:.4%})"
            )
    # Without remove_columns an input column the packs do not replace (here "id") has the wrong length.
    with_id = ds.add_column("id", [str(i) for i in range(len(ds))])
    with pytest.raises(Exception, match="(?i)column|length|rows"):
        with_id.map(chatmask.datasets.pack_fn(MAX), batched=True, batch_size=100)


def test_pack_fn_pickles_and_rejects_bad_options():
    import pickle

    fn = chatmask.datasets.pack_fn(MAX, "ffd", overflow="split")
    assert repr(pickle.loads(pickle.dumps(fn))) == repr(fn)
    with pytest.raises(ValueError, match="strategy"):
        chatmask.datasets.pack_fn(MAX, "best")
    with pytest.raises(KeyError, match="input_ids"):
        fn(_table_without_ids())


def _table_without_ids():
    pa = need("pyarrow")
    return pa.table({"text": ["a"]})


def test_ray_data_pack_per_block(ray_cluster, capsys):
    pa = need("pyarrow")
    from chatmask.ray_data import PackBatch

    batch = tokenized(4000)
    table = pa.table(columns(batch))
    ds = ray_cluster.data.from_arrow(table).repartition(4)
    out = ds.map_batches(
        PackBatch, fn_constructor_kwargs={"max_length": MAX}, batch_size=500, batch_format="pyarrow", concurrency=1
    )
    rows = out.take_all()
    packs = [{k: list(v) for k, v in r.items()} for r in rows]
    got, tokens, n = sequences(packs)
    assert got == expected(batch)
    whole = chatmask.pack(batch, MAX)
    eff = tokens / (n * MAX)
    with capsys.disabled():
        print(
            f"\nray PackBatch, blocks of <= 500 rows: {n} packs, efficiency {eff:.4%}; "
            f"one pack call: {len(whole)} packs, {whole.efficiency:.4%} (block-edge cost {whole.efficiency - eff:+.4%})"
        )
    assert n >= len(whole)
    assert np.isclose(whole.efficiency, whole.tokens / (len(whole) * MAX))
