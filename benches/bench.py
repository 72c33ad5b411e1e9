"""chatmask speed against the reference and the `tokenizers` floor, in one process.

For each fixture tokenizer, on the same conversations (a mix of every ../shared conversation
file), it times:

* the reference (atropos' code on transformers 5, through ../shared/reference/oracle.py);
* the chatmask drop-in called in a loop (one thread);
* `ChatTokenizer.tokenize_batch` with 1 thread and with all threads (the fast engine, and the
  same core forced onto the `tokenizers` crate for comparison);
* the drop-in and the reference on a 2-message chat (the per-call overhead);
* the floor: Python `tokenizers` `encode_batch(texts, add_special_tokens=False)` of the same
  conversations, pre-rendered (rendering not timed), sequential and parallel.

Each figure is the median of --repeats rounds (the methods are interleaved round-robin, so machine
noise hits them alike); ratios are geometric means over the tokenizers.

    python benches/bench.py [--per-file 64] [--repeats 5] [--write-readme] [--memory]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _parity  # noqa: E402

import chatmask  # noqa: E402

DATE = "26 Jul 2024"
MAX_CHARS = 6000  # keeps the mix near the ~500 tokens per conversation the issues quote


def kwargs_of(row):
    kw = {"date_string": DATE}
    if row.get("tools"):
        kw["tools"] = row["tools"]
    return kw


def build_mix(tok, per_file):
    """Rows the reference labels without raising, `per_file` from each file, small enough to mix."""
    ref = _parity.oracle()
    rows = []
    for path in _parity.conversation_files():
        taken = 0
        for row in ref.read_conversations(path):
            if taken >= per_file:
                break
            if sum(len(str(m.get("content", ""))) for m in row["messages"]) > MAX_CHARS:
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ref.reference(tok, row["messages"], "all", **kwargs_of(row))
            except Exception:
                continue
            rows.append(row)
            taken += 1
    return rows


def bench_tokenizer(name, per_file, repeats, threads):
    from tokenizers import Tokenizer

    ref = _parity.oracle()
    tok = ref.load_tokenizer(name)
    core = chatmask.ChatTokenizer.from_transformers(tok)
    slow_core = chatmask.ChatTokenizer.from_transformers(tok, encoder="tokenizers")
    rows = build_mix(tok, per_file)
    chats = [r["messages"] for r in rows]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, **kwargs_of(r)) for r in rows]
    fast = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    n_tokens = sum(len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False))

    def reference(mode):
        with contextlib.redirect_stdout(io.StringIO()):
            for r in rows:
                ref.reference(tok, r["messages"], mode, **kwargs_of(r))

    def dropin(mode):
        for r in rows:
            chatmask.tokenize_for_trainer(
                tok, r["messages"], train_on_all_assistant_turns=mode == "all", **kwargs_of(r)
            )

    def batch(mode, n, on=core):
        on.tokenize_batch(rows, mode=mode, num_threads=n, date_string=DATE)

    small = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]

    def small_chat(fn):
        for _ in range(200):
            fn()

    def small_reference():
        with contextlib.redirect_stdout(io.StringIO()):
            small_chat(lambda: ref.reference(tok, small, "last", date_string=DATE))

    policy = chatmask.MaskPolicy()

    def span_policy(n):
        core.tokenize_batch(rows, policy=policy, num_threads=n, date_string=DATE)

    def floor(parallel):
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
        fast.encode_batch(texts, add_special_tokens=False)

    dropin("last")  # builds and caches the core outside the timings
    methods = {
        "ref_last": lambda: reference("last"),
        "ref_all": lambda: reference("all"),
        "dropin_last": lambda: dropin("last"),
        "dropin_all": lambda: dropin("all"),
        "batch1_last": lambda: batch("last", 1),
        "batch1_all": lambda: batch("all", 1),
        "batchN_last": lambda: batch("last", threads),
        "batchN_all": lambda: batch("all", threads),
        "policy1": lambda: span_policy(1),
        "policyN": lambda: span_policy(threads),
        "slowbatch1_last": lambda: batch("last", 1, slow_core),
        "small_ref": small_reference,
        "small_dropin": lambda: small_chat(lambda: chatmask.tokenize_for_trainer(tok, small, date_string=DATE)),
        "floor1": lambda: floor(False),
        "floorN": lambda: floor(True),
    }
    # Round-robin over the methods, so a noisy stretch of the machine hits all of them alike.
    samples = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in samples.items()}
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    # The engine starts no threads of its own: with one thread, CPU time equals wall time.
    cpu0, wall0 = time.process_time(), time.perf_counter()
    batch("last", 1)
    cpu_over_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return {
        "name": name,
        "conversations": len(rows),
        "tokens": n_tokens,
        "seconds": t,
        "chats": len(chats),
        "encoder": core.encoder_backend,
        "check_seconds": core._core.encoder_check_seconds,
        "cpu_over_wall_1t": cpu_over_wall,
    }


RATIOS = {
    "drop-in / reference, last-turn (1 thread)": ("ref_last", "dropin_last"),
    "drop-in / reference, all-turns (1 thread)": ("ref_all", "dropin_all"),
    "batch all cores / floor all cores, last-turn": ("floorN", "batchN_last"),
    "batch all cores / floor all cores, all-turns": ("floorN", "batchN_all"),
    "batch 1 thread / floor 1 thread, last-turn": ("floor1", "batch1_last"),
    "batch 1 thread (tokenizers engine) / floor 1 thread, last-turn": ("floor1", "slowbatch1_last"),
    "drop-in / reference, 2-message chat": ("small_ref", "small_dropin"),
    "MaskPolicy batch 1 thread / floor 1 thread": ("floor1", "policy1"),
    "batch all cores / batch 1 thread, last-turn": ("batch1_last", "batchN_last"),
    "batch all cores / batch 1 thread, all-turns": ("batch1_all", "batchN_all"),
    "MaskPolicy batch 1 thread / reference all-turns": ("ref_all", "policy1"),
    "MaskPolicy batch all cores / floor all cores": ("floorN", "policyN"),
    "MaskPolicy batch 1 thread / batch 1 thread all-turns": ("batch1_all", "policy1"),
}


def speedup(result, slow, fast):
    return result["seconds"][slow] / result["seconds"][fast]


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def memory_check(name, n_rows):
    """Peak-RSS growth of tokenize_batch over n_rows conversations vs the bytes it returns (subprocess)."""
    code = f"""
import resource, sys, json
sys.path.insert(0, {str(ROOT / "tests")!r})
import _parity, chatmask
tok = _parity.oracle().load_tokenizer({name!r})
core = chatmask.ChatTokenizer.from_transformers(tok)
rows = [r for p in _parity.conversation_files() for i, r in zip(range(64), _parity.oracle().read_conversations(p))]
rows = (rows * ({n_rows} // len(rows) + 1))[:{n_rows}]
core.tokenize_batch(rows[:100], mode="all", on_error="skip", date_string="26 Jul 2024")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
b = core.tokenize_batch(rows, mode="all", on_error="skip", date_string="26 Jul 2024")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = sum(a.nbytes for a in (b.input_ids, b.labels, b.offsets, b.label_offsets, b.rows))
print(json.dumps({{"rows": {n_rows}, "growth": after - before, "returned": out, "encoder": core.encoder_backend}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def table(results, threads, memory):
    lines = [
        f"Machine: {machine()}. {threads} threads for 'all cores'. Medians of the repeats; "
        f"conversations/s (c/s) on the same mix for every column.",
        "",
        "| tokenizer | convs | avg tokens | reference last c/s | reference all c/s | drop-in last c/s | drop-in all c/s "
        "| batch 1t last c/s | batch all last c/s | batch all all-turns c/s | MaskPolicy 1t c/s | MaskPolicy all c/s "
        "| floor 1t c/s | floor all c/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, n = r["seconds"], r["conversations"]
        cps = lambda k: f"{n / s[k]:,.0f}"  # noqa: E731
        lines.append(
            f"| {r['name']} | {n} | {r['tokens'] / n:,.0f} | {cps('ref_last')} | {cps('ref_all')} | {cps('dropin_last')} "
            f"| {cps('dropin_all')} | {cps('batch1_last')} | {cps('batchN_last')} | {cps('batchN_all')} "
            f"| {cps('policy1')} | {cps('policyN')} | {cps('floor1')} | {cps('floorN')} |"
        )
    lines += ["", "| ratio (geometric mean over the tokenizers) | value |", "|---|---:|"]
    for label, (slow, fast) in RATIOS.items():
        lines.append(f"| {label} | {geomean([speedup(r, slow, fast) for r in results]):.2f}x |")
    if memory:
        lines.append(
            f"| peak-RSS growth of tokenize_batch over {memory['rows']:,} conversations / bytes returned "
            f"({memory['encoder']} engine) "
            f"| {memory['growth'] / memory['returned']:.2f}x ({memory['growth'] / 2**20:,.0f} MiB) |"
        )
    lines.append("")
    lines.append(
        "Encoder per tokenizer (self-check load cost; CPU/wall of a 1-thread batch): "
        + "; ".join(
            f"{r['name']} {r['encoder']} (gate: engine build {r['check_seconds'][0] * 1000:,.0f} ms + self-check "
            f"{r['check_seconds'][1] * 1000:,.0f} ms; CPU/wall {r['cpu_over_wall_1t']:.2f})"
            for r in results
        )
        + "."
    )
    return "\n".join(lines)


def write_readme(text):
    readme = ROOT / "README.md"
    body = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in body and end in body:
        head, rest = body.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-file", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS over 100k conversations")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else _parity.fixture_tokenizers()
    results = []
    for name in names:
        r = bench_tokenizer(name, args.per_file, args.repeats, args.threads)
        results.append(r)
        print(
            json.dumps(
                {
                    "name": name,
                    "conversations": r["conversations"],
                    "tokens": r["tokens"],
                    "encoder": r["encoder"],
                    "check_seconds": r["check_seconds"],
                    "cpu_over_wall_1t": r["cpu_over_wall_1t"],
                    **{k: round(r["conversations"] / v, 1) for k, v in r["seconds"].items()},
                }
            ),
            flush=True,
        )
    memory = memory_check(names[0], 100_000) if args.memory else None
    text = table(results, args.threads, memory)
    print(text)
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
