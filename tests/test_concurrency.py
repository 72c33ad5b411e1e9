"""Threads, fork and the GIL: the batch engine must be usable from real training pipelines."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import chatmask
from chatmask.demo import demo_conversations, demo_tokenizer


def chats(n):
    rows = [r["messages"] for r in demo_conversations()[:7]]
    return (rows * (n // len(rows) + 1))[:n]


def test_output_is_deterministic_across_thread_counts():
    tok = demo_tokenizer()
    rows = chats(3000)
    one = tok.tokenize_batch(rows, mode="all", num_threads=1)
    two = tok.tokenize_batch(rows, mode="all", num_threads=2)
    four = tok.tokenize_batch(rows, mode="all", num_threads=4)
    for other in (two, four):
        assert (one.input_ids == other.input_ids).all() and (one.labels == other.labels).all()
        assert (one.offsets == other.offsets).all() and (one.rows == other.rows).all()


def test_rayon_num_threads_is_honoured():
    code = "import chatmask._core as c; print(c.default_threads())"
    env = {**os.environ, "RAYON_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_batch_works_in_a_forked_child():
    tok = demo_tokenizer()
    rows = chats(500)
    expected = tok.tokenize_batch(rows, num_threads=2).input_ids.sum()  # the parent's pool now exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not wait on the parent's (absent) pool threads
        try:
            got = tok.tokenize_batch(rows, num_threads=2).input_ids.sum()
            os.write(w, str(int(got)).encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("forked child deadlocked in tokenize_batch")
    assert os.read(r, 100).decode() == str(int(expected))


def test_multiprocessing_fork_pool():
    import multiprocessing as mp

    tok = demo_tokenizer()
    tok.tokenize_batch(chats(100))
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        sums = pool.map(_child_sum, [50, 60], chunksize=1)
    assert sums == [_child_sum(50), _child_sum(60)]


def _child_sum(n):
    return int(demo_tokenizer().tokenize_batch(chats(n)).input_ids.sum())


def test_batch_releases_the_gil():
    tok = demo_tokenizer()
    rows = chats(20000)
    ticks = 0
    done = threading.Event()

    def run():
        tok.tokenize_batch(rows, mode="all", num_threads=1)
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 20, f"main thread ran only {ticks} times during the batch"


def test_concurrent_calls_share_one_tokenizer():
    tok = demo_tokenizer()
    rows = chats(200)
    want_single = [tok.tokenize_for_trainer(c, mode="all") for c in rows[:6] if c[0]["role"] != "assistant"]
    want_batch = tok.tokenize_batch(rows, mode="all", on_error="skip").to_list()
    errors = []

    def single():
        for _ in range(20):
            got = [tok.tokenize_for_trainer(c, mode="all") for c in rows[:6] if c[0]["role"] != "assistant"]
            if got != want_single:
                errors.append("single")

    def batched():
        for _ in range(5):
            if tok.tokenize_batch(rows, mode="all", on_error="skip").to_list() != want_batch:
                errors.append("batch")

    threads = [threading.Thread(target=f) for f in (single, batched, single, batched)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert chatmask.ChatMaskError  # the hierarchy import stays available across threads
