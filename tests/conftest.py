"""Shared test setup: where the ../shared fixtures are, and whether missing ones fail or skip.

Under ``CI=true`` a missing fixture is a failure; elsewhere tests that need ../shared are
skipped, and the core suite (demo tokenizer, no fixtures) still runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parity import CONVERSATIONS_DIR, SHARED, TOKENIZERS_DIR  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"

# Collected by the parity tests and printed at the end of the run.
PARITY_TOTALS = {"cases": 0, "tokens_compared": 0, "both_raised": 0, "mismatches": 0}

# Collected by tests/test_fuzz.py (hypothesis examples compared with the reference) and printed at the end.
# Collected by tests/test_encoder.py (fast engine vs the tokenizers crate) and printed at the end.
ENCODER_TOTALS = {"texts": 0, "ids": 0, "differences": 0, "fuzz_examples": 0, "output_rows": 0, "output_values": 0}

FUZZ_TOTALS = {"examples": 0, "cases": 0, "tokens_compared": 0, "both_raised": 0, "failures": 0, "span_examples": 0}


def require_shared(*parts: str) -> Path:
    """The path under ../shared, or skip (fail under CI=true) when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"fixture missing: {path}"
        if IN_CI:
            pytest.fail(message + " (CI=true: fixtures are required)")
        pytest.skip(message)
    return path


def fixture_names() -> list[str]:
    if TOKENIZERS_DIR.exists():
        return sorted(p.name for p in TOKENIZERS_DIR.iterdir() if (p / "tokenizer.json").exists())
    # Collected anyway so a missing ../shared fails under CI instead of collecting nothing.
    return ["qwen3"]


def conversation_file_names() -> list[str]:
    if CONVERSATIONS_DIR.exists():
        return sorted(p.name for p in CONVERSATIONS_DIR.glob("*.jsonl"))
    return ["alpaca_single_turn.jsonl"]


def pytest_terminal_summary(terminalreporter):
    if PARITY_TOTALS["cases"]:
        t = PARITY_TOTALS
        terminalreporter.write_line(
            f"parity vs reference: {t['cases']} cases, {t['tokens_compared']} tokens+labels compared element "
            f"by element, {t['both_raised']} raised alike, {t['mismatches']} mismatches"
        )
    if ENCODER_TOTALS["texts"]:
        e = ENCODER_TOTALS
        terminalreporter.write_line(
            f"fast encoder vs tokenizers: {e['texts']} texts ({e['fuzz_examples']} fuzz examples), {e['ids']} ids "
            f"compared element by element, {e['differences']} differences; {e['output_rows']} row outputs, "
            f"{e['output_values']} output values equal on both engines"
        )
    if FUZZ_TOTALS["examples"] or FUZZ_TOTALS["span_examples"]:
        f = FUZZ_TOTALS
        terminalreporter.write_line(
            f"fuzz vs reference: {f['examples']} examples ({f['cases']} mode x finish_reason cases, "
            f"{f['cases'] - f['both_raised']} equal, {f['both_raised']} raised alike, {f['tokens_compared']} "
            f"tokens+labels compared), {f['failures']} failing examples seen while shrinking; "
            f"{f['span_examples']} generation-span examples"
        )


# Optional frameworks and their fixtures (tests/test_adapters.py, tests/test_preference_adapters.py)


def need(module: str) -> Any:
    """Import an optional framework; skip without it, but fail under CI=true (the test extra has it)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"{module} is not importable under CI=true ({e}); it is in the test extra")
        pytest.skip(f"{module} is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def hf():
    datasets = need("datasets")
    datasets.disable_progress_bars()
    return datasets


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    # Keep the local cluster on loopback: without this Ray binds to the machine's outward address.
    # (Read by ray when it is imported; the cluster's processes inherit it.)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = need("ray")
    need("ray.data")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Ray starts a pool's actors asynchronously and hands out batches as soon as one is ready;
    # on 2 busy CPUs the second actor was once still starting when the last batch was done (CI),
    # and run_ray's "two actors" check failed. Waiting for the whole pool makes it a fact.
    context.wait_for_min_actors_s = 300
    try:
        yield ray
    finally:
        ray.shutdown()
