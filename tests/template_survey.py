#!/usr/bin/env python3
"""Survey: render every fixture chat template with chatmask and with transformers' Jinja2 path, compare.

Not a pytest test (no ``test_`` prefix): run it directly.

    python tests/template_survey.py [--out /tmp/template_survey.json] [--only NAME ...] [--workers N]

Cases per template: the three built-in conversations of render_check.py (plain, system_multiturn, tool_call),
the first 3 rows of every conversation file, each with add_generation_prompt False and True, plus every
proper prefix chat[:i] (i=1..len-1) of the built-in conversations (the full chat is already a case).

Each case is classified as identical / both_raised / compile_error / mismatch / only_chatmask_raised /
only_jinja_raised (or slow). Each template runs in a worker process that the parent kills when the
template exceeds a wall-clock budget (category "slow"), so a hang in Rust cannot stall the run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import importlib.util
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import re
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _parity import CONVERSATIONS_DIR, SHARED  # noqa: E402

TEMPLATES_DIR = str(SHARED / "fixtures" / "templates")
CONV_DIR = str(CONVERSATIONS_DIR)
DATE_STRING = "26 Jul 2024"
ROWS_PER_FILE = 3
CASE_SLOW_S = 5.0  # a chatmask render slower than this marks the case "slow"
JINJA_TIMEOUT_S = 30.0  # the Jinja2 oracle itself can take seconds on huge messages; only a hang counts as "slow"
TEMPLATE_BUDGET_S = 90.0  # wall clock per template before the worker is killed
CLASSES = ["identical", "both_raised", "compile_error", "mismatch", "only_chatmask_raised", "only_jinja_raised", "slow"]
FAILING = {"compile_error", "mismatch", "only_chatmask_raised", "slow"}


def _load_render_check():
    spec = importlib.util.spec_from_file_location("render_check", os.path.join(TEMPLATES_DIR, "render_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_cases():
    rc = _load_render_check()
    cases = []  # (case_id, messages, tools)
    for name, conv in rc.CONVERSATIONS.items():
        msgs = conv["messages"]
        tools = conv.get("tools") or None
        cases.append((f"builtin:{name}", msgs, tools))
        for i in range(1, len(msgs)):
            cases.append((f"prefix:{name}[:{i}]", msgs[:i], tools))
    for path in sorted(glob.glob(os.path.join(CONV_DIR, "*.jsonl"))):
        stem = os.path.basename(path)[: -len(".jsonl")]
        with open(path, encoding="utf-8") as f:
            for n in range(ROWS_PER_FILE):
                line = f.readline()
                if not line:
                    break
                row = json.loads(line)
                cases.append((f"{stem}:{row.get('id', n)}", row["messages"], row.get("tools") or None))
    return rc.EXTRA_VARS, cases


def first_line(exc):
    s = str(exc).strip()
    return s.splitlines()[0] if s else ""


def err_str(exc):
    return f"{type(exc).__name__}: {str(exc)[:600]}"


def diff_context(a, b, width=60):
    """a = jinja, b = chatmask."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    lo = max(0, i - width // 2)
    return {
        "pos": i,
        "len_jinja": len(a),
        "len_chatmask": len(b),
        "jinja": a[lo : i + width // 2],
        "chatmask": b[lo : i + width // 2],
        "offset": lo,
    }


def mismatch_label(a, b):
    """Short label for where the two renders first diverge: the differing snippets after common prefix/suffix."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    j = 0
    while j < n - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
        j += 1
    da, db = a[i : len(a) - j], b[i : len(b) - j]

    def norm(s):  # coarse, so one construct differing on many inputs groups together
        s = re.sub(r"\d+", "N", s)
        s = re.sub(r"[^\W\d_]+", "w", s)
        return s if len(s) <= 12 else s[:12] + "…"

    return f"mismatch: jinja {norm(da)!r} vs chatmask {norm(db)!r}"


def normalize_error(msg):
    m = msg.splitlines()[0] if msg else ""
    m = re.sub(r"\(in [^)]*\)", "", m)  # location suffixes
    m = re.sub(r"line \d+", "line N", m)
    m = re.sub(r"\d+", "N", m)
    m = re.sub(r"'[^']*'", "'X'", m)
    m = re.sub(r'"[^"]*"', '"X"', m)
    m = re.sub(r"`[^`]*`", "`X`", m)
    m = re.sub(r"\s+", " ", m).strip()
    return m[:140]


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm(f"jinja render took longer than {JINJA_TIMEOUT_S}s")


def survey_template(name, source, extra_vars, cases):
    from transformers.utils.chat_template_utils import render_jinja_template

    import chatmask

    rec = {"name": name, "counts": collections.Counter(), "failures": [], "categories": {}}

    def fail(case_key, cls, category, detail):
        rec["categories"].setdefault(category, 0)
        rec["categories"][category] += 1
        if len(rec["failures"]) < 3:
            rec["failures"].append({"case": case_key, "class": cls, "category": category, **detail})

    try:
        tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), source, dict(extra_vars))
        core = tok._core
        compile_err = None
    except Exception as exc:
        core = None
        compile_err = exc

    signal.signal(signal.SIGALRM, _on_alarm)
    for case_id, messages, tools in cases:
        for agp in (False, True):
            key = f"{case_id}/agp={int(agp)}"
            # jinja oracle
            jinja_out = jinja_exc = None
            chat = [{k: v for k, v in m.items() if v is not None} for m in copy.deepcopy(messages)]
            t0 = time.time()
            signal.setitimer(signal.ITIMER_REAL, JINJA_TIMEOUT_S)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = render_jinja_template(
                        conversations=[chat],
                        tools=copy.deepcopy(tools),
                        chat_template=source,
                        add_generation_prompt=agp,
                        date_string=DATE_STRING,
                        **extra_vars,
                    )
                out = out[0] if isinstance(out, tuple) else out
                jinja_out = out[0] if isinstance(out, list) else out
            except _Alarm as exc:
                jinja_exc = exc
            except Exception as exc:
                jinja_exc = exc
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            jinja_slow = isinstance(jinja_exc, _Alarm)

            if compile_err is not None:
                cls = "compile_error"
                rec["counts"][cls] += 1
                fail(
                    key,
                    cls,
                    "compile_error: " + normalize_error(first_line(compile_err)),
                    {"chatmask_error": err_str(compile_err)},
                )
                continue

            cm_out = cm_exc = None
            t0 = time.time()
            try:
                cm_out = core.render(
                    copy.deepcopy(messages),
                    add_generation_prompt=agp,
                    tools=copy.deepcopy(tools),
                    date_string=DATE_STRING,
                )
            except Exception as exc:
                cm_exc = exc
            cm_dt = time.time() - t0

            if jinja_slow or cm_dt > CASE_SLOW_S:
                cls = "slow"
                rec["counts"][cls] += 1
                fail(key, cls, "slow", {"chatmask_seconds": round(cm_dt, 2), "jinja_timed_out": jinja_slow})
            elif jinja_exc is None and cm_exc is None:
                if jinja_out == cm_out:
                    rec["counts"]["identical"] += 1
                else:
                    cls = "mismatch"
                    rec["counts"][cls] += 1
                    fail(key, cls, mismatch_label(jinja_out, cm_out), {"diff": diff_context(jinja_out, cm_out)})
            elif jinja_exc is not None and cm_exc is not None:
                rec["counts"]["both_raised"] += 1
            elif cm_exc is not None:
                cls = "only_chatmask_raised"
                rec["counts"][cls] += 1
                fail(
                    key,
                    cls,
                    f"{type(cm_exc).__name__}: " + normalize_error(first_line(cm_exc)),
                    {"chatmask_error": err_str(cm_exc)},
                )
            else:
                cls = "only_jinja_raised"
                rec["counts"][cls] += 1
                cat = f"only_jinja_raised: {type(jinja_exc).__name__}: " + normalize_error(first_line(jinja_exc))
                rec["categories"].setdefault(cat, 0)
                rec["categories"][cat] += 1
                if "jinja_errors" not in rec:
                    rec["jinja_errors"] = []
                if len(rec["jinja_errors"]) < 3:
                    rec["jinja_errors"].append({"case": key, "jinja_error": err_str(jinja_exc)})
    rec["counts"] = dict(rec["counts"])
    rec["compiles"] = compile_err is None
    rec["native_ok"] = compile_err is None and not any(rec["counts"].get(c) for c in FAILING)
    return rec


def worker_main(conn, extra_vars, cases):
    warnings.simplefilter("ignore")
    import transformers.utils.chat_template_utils  # noqa: F401

    import chatmask  # noqa: F401  (warm imports before the first timed template)

    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, source = msg
        try:
            rec = survey_template(name, source, extra_vars, cases)
        except BaseException as exc:  # never let one template kill the worker silently
            rec = {
                "name": name,
                "counts": {"survey_crash": 1},
                "failures": [{"category": "survey_crash", "error": err_str(exc)}],
                "categories": {"survey_crash": 1},
                "compiles": False,
                "native_ok": False,
            }
        conn.send(rec)


def run(templates, extra_vars, cases, workers):
    ctx = mp.get_context("fork")
    pending = list(templates)
    results = []
    slots = []  # dicts: proc, conn, job, started

    def spawn():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(child, extra_vars, cases), daemon=True)
        p.start()
        child.close()
        return {"proc": p, "conn": parent, "job": None, "started": 0.0}

    slots = [spawn() for _ in range(workers)]
    done = 0
    total = len(templates)
    t_start = time.time()
    while pending or any(s["job"] for s in slots):
        for s in slots:
            if s["job"] is None and pending:
                name, path = pending.pop(0)
                with open(path, encoding="utf-8") as f:
                    src = f.read()
                s["job"] = name
                s["started"] = time.time()
                s["conn"].send((name, src))
        ready = mpc.wait([s["conn"] for s in slots if s["job"]], timeout=0.5)
        for s in slots:
            if s["job"] and s["conn"] in ready:
                try:
                    rec = s["conn"].recv()
                except EOFError:  # worker died (e.g. a Rust panic aborting the process)
                    rec = {
                        "name": s["job"],
                        "counts": {"worker_died": 1},
                        "categories": {"worker_died": 1},
                        "failures": [{"category": "worker_died", "exitcode": s["proc"].exitcode}],
                        "compiles": False,
                        "native_ok": False,
                    }
                    s["proc"].join(1)
                    s.update(spawn())
                results.append(rec)
                s["job"] = None
                done += 1
                if done % 50 == 0:
                    print(f"  {done}/{total} templates, {time.time() - t_start:.0f}s", file=sys.stderr, flush=True)
        for s in slots:
            if s["job"] and time.time() - s["started"] > TEMPLATE_BUDGET_S:
                s["proc"].kill()
                s["proc"].join(5)
                results.append(
                    {
                        "name": s["job"],
                        "counts": {"slow": 1},
                        "categories": {"slow": 1},
                        "failures": [{"category": "slow", "detail": f"template exceeded {TEMPLATE_BUDGET_S}s"}],
                        "compiles": None,
                        "native_ok": False,
                    }
                )
                done += 1
                fresh = spawn()
                s.update(fresh)
    for s in slots:
        try:
            s["conn"].send(None)
        except Exception:
            pass
        s["proc"].join(5)
        if s["proc"].is_alive():
            s["proc"].kill()
    return results


def summarize(results, n_cases, seconds):
    results.sort(key=lambda r: r["name"])
    per_class = collections.Counter()
    for r in results:
        per_class.update(r["counts"])
    cats = collections.defaultdict(lambda: {"templates": 0, "cases": 0, "example": None})
    for r in results:
        for c, k in r["categories"].items():
            cats[c]["templates"] += 1
            cats[c]["cases"] += k
            if cats[c]["example"] is None:
                cats[c]["example"] = r["name"]
    ranked = sorted(cats.items(), key=lambda kv: (-kv[1]["templates"], -kv[1]["cases"], kv[0]))
    top = [kv for kv in ranked if not kv[0].startswith("only_jinja_raised")]
    jinja_only = [kv for kv in ranked if kv[0].startswith("only_jinja_raised")]
    native_ok = sum(1 for r in results if r["native_ok"])
    return {
        "templates": len(results),
        "cases_per_template": n_cases,
        "native_ok": native_ok,
        "compile_errors": sum(1 for r in results if r.get("compiles") is False and "compile_error" in r["counts"]),
        "per_class_cases": {c: per_class.get(c, 0) for c in CLASSES}
        | {k: v for k, v in per_class.items() if k not in CLASSES},
        "templates_with_class": {c: sum(1 for r in results if r["counts"].get(c)) for c in CLASSES},
        "top_failure_categories": [{"category": c, **v} for c, v in top],
        "only_jinja_raised_categories": [{"category": c, **v} for c, v in jinja_only],
        "seconds": round(seconds, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/template_survey.json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()

    extra_vars, cases = build_cases()
    paths = sorted(glob.glob(os.path.join(TEMPLATES_DIR, "*.jinja")))
    templates = [(os.path.basename(p)[: -len(".jinja")], p) for p in paths]
    if args.only:
        templates = [t for t in templates if t[0] in set(args.only)]
    print(f"{len(templates)} templates x {len(cases)} conversations x 2 agp", file=sys.stderr)

    t0 = time.time()
    results = run(templates, extra_vars, cases, args.workers)
    summary = summarize(results, 2 * len(cases), time.time() - t0)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "templates": results}, f, indent=1, ensure_ascii=False)

    print(
        f"native-ok: {summary['native_ok']} / {summary['templates']} templates "
        f"({summary['cases_per_template']} cases each; compile errors: {summary['compile_errors']}; "
        f"{summary['seconds']}s)"
    )
    print("cases per class:")
    for c, n in summary["per_class_cases"].items():
        print(f"  {c:22s} {n:7d}   (templates: {summary['templates_with_class'].get(c, '-')})")
    print("top 25 failure categories (templates, cases, example):")
    for e in summary["top_failure_categories"][:25]:
        print(f"  {e['templates']:4d} {e['cases']:6d}  {e['category'][:110]}   e.g. {e['example']}")
    if summary["only_jinja_raised_categories"]:
        print("only_jinja_raised (chatmask rendered where Jinja2 raised; not counted against native-ok):")
        for e in summary["only_jinja_raised_categories"][:10]:
            print(f"  {e['templates']:4d} {e['cases']:6d}  {e['category'][:110]}   e.g. {e['example']}")
    print(f"details: {args.out}")


if __name__ == "__main__":
    main()
