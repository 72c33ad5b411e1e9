"""`chatmask tokenize` at scale: a 1M-row JSONL corpus through the CLI, against the batch API.

It writes a corpus (not kept in the repo) by cycling the ../shared conversation files with a
distinct `id` per row, breaking one row in every 100,000 on purpose (invalid JSON, then a
missing messages field, alternately) so the error accounting is exercised, then:

1. runs `python -m chatmask tokenize CORPUS -o OUT --quiet` as a child process and reads its
   wall time and peak RSS (`wait4`), and checks the manifest: rows_in == rows_out + rows_failed,
   the failed rows are exactly the broken ones, and errors.jsonl lists them;
2. times `ChatTokenizer.tokenize_batch` (same tokenizer, mode and thread count) on the same
   good rows, parsed beforehand (parsing not timed), in 4,096-row chunks with the output
   discarded: the batch API's best case.

Throughput ratio = CLI rows/s (end to end: reading, JSON parsing, tokenizing, Parquet writing)
over batch API rows/s.

    python benches/pipeline_scale.py [--rows 1000000] [--tokenizer qwen3] [--mode all] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _parity  # noqa: E402

import chatmask  # noqa: E402

BROKEN_EVERY = 100_000
MAX_CHARS = 6000  # the same mix as benches/bench.py: ~750 tokens per conversation
CHUNK = 4096


def source_lines() -> list[dict]:
    rows = []
    for path in _parity.conversation_files():
        for row in _parity.oracle().read_conversations(path):
            if sum(len(str(m.get("content", ""))) for m in row["messages"]) <= MAX_CHARS:
                rows.append(row)
    return rows


def write_corpus(path: Path, n: int) -> list[int]:
    """Writes n rows; returns the row numbers broken on purpose."""
    rows = source_lines()
    broken = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % BROKEN_EVERY == BROKEN_EVERY - 1:
                broken.append(i)
                f.write('{"id": "broken", "messages": [\n' if len(broken) % 2 else '{"id": "no-messages"}\n')
                continue
            row = rows[i % len(rows)]
            out = {"id": f"r{i}", "messages": row["messages"]}
            if row.get("tools"):
                out["tools"] = row["tools"]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return broken


def run_cli(
    corpus: Path, out: Path, tokenizer: Path, mode: str, threads: int, extra: list[str] | None = None
) -> tuple[float, int, float]:
    """Wall seconds, peak RSS in bytes and CPU seconds (user + system) of the CLI child."""
    labels = [] if mode == "policy" else ["--mode", mode]
    cmd = [
        sys.executable,
        "-m",
        "chatmask",
        "tokenize",
        str(corpus),
        "-o",
        str(out),
        "--tokenizer",
        str(tokenizer),
        *labels,
        "--threads",
        str(threads),
        "--quiet",
        *(extra or []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"chatmask tokenize failed with status {status}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def time_batch_api(corpus: Path, tokenizer: Path, mode: str, threads: int) -> tuple[float, int, int, int, float]:
    """Tokenizing wall seconds, rows, tokens, failed rows, tokenizing CPU seconds (all threads)."""
    tok = chatmask.ChatTokenizer.from_pretrained(tokenizer)
    seconds = cpu = 0.0
    rows = tokens = failed = 0
    chunk: list[dict] = []

    def flush():
        nonlocal seconds, cpu, rows, tokens, failed
        t0, c0 = time.perf_counter(), time.process_time()
        # The same labels as the CLI: its default MaskPolicy, or a reference mode flagged as it flags.
        if mode == "policy":
            batch = tok.tokenize_batch(chunk, policy=chatmask.MaskPolicy(), num_threads=threads, on_error="skip")
        else:
            batch = tok.tokenize_batch(chunk, mode=mode, num_threads=threads, on_error="skip", flag_reference=True)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        rows += len(batch)
        tokens += len(batch.input_ids)
        failed += len(batch.errors)
        chunk.clear()

    with open(corpus, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "messages" in row:
                chunk.append(row)
            if len(chunk) == CHUNK:
                flush()
    if chunk:
        flush()
    return seconds, rows, tokens, failed, cpu


def pack_overhead(args, corpus, work, tokenizer, plain, cli_s, cli_cpu, rss) -> int:
    """The same CLI run with --pack: the time and CPU packing adds, and the same rows out."""
    out = work / "out-pack"
    pack_s, pack_rss, pack_cpu = run_cli(corpus, out, tokenizer, args.mode, args.threads, ["--pack", str(args.pack)])
    manifest = json.loads((out / "manifest.json").read_text())
    same = all(manifest[k] == plain[k] for k in ("rows_in", "rows_out", "rows_failed", "tokens"))
    print(f"cli --pack {args.pack}: {pack_s:.1f} s, {pack_cpu:.1f} s CPU, peak RSS {pack_rss / 2**20:,.0f} MiB")
    print("pack manifest:", json.dumps(manifest["pack"]))
    print(
        f"packing adds: wall {pack_s - cli_s:+.1f} s ({(pack_s / cli_s - 1):+.1%}), CPU {pack_cpu - cli_cpu:+.1f} s "
        f"({(pack_cpu / cli_cpu - 1):+.1%}); manifest seconds {plain['seconds']:.1f} -> {manifest['seconds']:.1f}; "
        f"same rows, failures and tokens as the unpacked run: {same}"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tokenizer", default="qwen3", help="a ../shared fixture tokenizer name")
    ap.add_argument(
        "--mode", default="all", help="last|all|multistep (flagged, as the CLI does), or policy (the CLI default)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default="/tmp/chatmask-scale")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and output")
    ap.add_argument(
        "--pack",
        type=int,
        metavar="MAX_LEN",
        help="also run the CLI with --pack MAX_LEN on the same corpus and report what packing adds "
        "(wall and CPU); the batch API comparison is skipped",
    )
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus, out = work / "corpus.jsonl", work / "out"
    tokenizer = _parity.TOKENIZERS_DIR / args.tokenizer

    t0 = time.perf_counter()
    broken = write_corpus(corpus, args.rows)
    print(
        f"corpus: {args.rows:,} rows, {corpus.stat().st_size / 2**30:.2f} GiB, {len(broken)} broken on purpose "
        f"({time.perf_counter() - t0:.0f} s to write)",
        flush=True,
    )

    cli_s, rss, cli_cpu = run_cli(corpus, out, tokenizer, args.mode, args.threads)
    manifest = json.loads((out / "manifest.json").read_text())
    failed_rows = [json.loads(line)["row"] for line in open(out / "errors.jsonl")]
    accounted = manifest["rows_in"] == manifest["rows_out"] + manifest["rows_failed"] == args.rows
    broken_listed = set(broken) <= set(failed_rows) and len(failed_rows) == manifest["rows_failed"]
    print(
        f"cli: {cli_s:.1f} s, {args.rows / cli_s:,.0f} rows/s, {cli_cpu:.1f} s CPU (start-up and loading "
        f"included), peak RSS {rss / 2**20:,.0f} MiB"
    )
    print(
        "manifest:",
        json.dumps(
            {k: manifest[k] for k in ("rows_in", "rows_out", "rows_failed", "tokens", "trained_tokens", "seconds")}
        ),
    )
    print(
        f"accounting: rows_in == rows_out + rows_failed: {accounted}; errors.jsonl lines == rows_failed and "
        f"every broken row listed: {broken_listed}; parts: {len(manifest['parts'])}",
        flush=True,
    )

    if args.pack:
        return pack_overhead(args, corpus, work, tokenizer, manifest, cli_s, cli_cpu, rss)
    api_s, api_rows, api_tokens, api_failed, api_cpu = time_batch_api(corpus, tokenizer, args.mode, args.threads)
    print(
        f"batch API: {api_s:.1f} s tokenizing, {api_cpu:.1f} s CPU, {api_rows / api_s:,.0f} rows/s ({api_rows:,} rows, "
        f"{api_tokens:,} tokens, {api_failed:,} rows the template rejects; parsing not timed)"
    )
    # The CLI's failures are the broken rows plus the rows the template rejects in the batch API too.
    same = (api_rows, api_tokens, api_failed + len(broken)) == (
        manifest["rows_out"],
        manifest["tokens"],
        manifest["rows_failed"],
    )
    ratio = (args.rows / cli_s) / (api_rows / api_s)
    print(f"same rows and tokens as the CLI: {same}")
    # CPU seconds per row, batch API over CLI: the wall ratio a quiet machine with all cores busy
    # would show (wall ratios move with whatever else the machine runs).
    print(
        f"manifest seconds (the job after loading): {manifest['seconds']:.1f}; CPU per row, batch API / CLI: "
        f"{(api_cpu / api_rows) / (cli_cpu / args.rows):.2f}x"
    )
    print(
        f"throughput CLI / batch API: {ratio:.2f}x   peak RSS: {rss / 2**20:,.0f} MiB "
        f"({args.threads} threads, {args.tokenizer}, mode {args.mode})"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = accounted and broken_listed and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
