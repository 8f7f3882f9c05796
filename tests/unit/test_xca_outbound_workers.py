"""gateway.xca.outbound.Workers: run_bounded's threads are reused across calls, an abandoned
call keeps only its own thread, and idle threads end after their idle time."""

from __future__ import annotations

import functools
import threading
import time

from gateway.xca.outbound import Workers, run_bounded


def _wait_idle(pool: Workers, n: int, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while pool.idle != n and time.monotonic() < end:
        time.sleep(0.005)
    assert pool.idle == n


def test_run_bounded_reuses_idle_threads() -> None:
    pool = Workers()
    seen: list[set[int]] = []
    for _ in range(3):
        idents: set[int] = set()
        lock = threading.Lock()
        barrier = threading.Barrier(4, timeout=5)  # all four run at once: four threads

        def call(i: int, barrier: threading.Barrier = barrier, lock: threading.Lock = lock,
                 idents: set[int] = idents) -> int:
            barrier.wait()
            with lock:
                idents.add(threading.get_ident())
            return i

        out = run_bounded([(i, functools.partial(call, i)) for i in range(4)], max_parallel=4,
                          timeout=5, threads=pool)
        assert {k: o.value for k, o in out.items()} == {0: 0, 1: 1, 2: 2, 3: 3}
        seen.append(idents)
        _wait_idle(pool, 4)
    assert pool.started == 4
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 4


def test_an_abandoned_call_keeps_its_thread_and_the_next_call_gets_another() -> None:
    pool = Workers()
    release = threading.Event()
    out = run_bounded([("hung", lambda: release.wait(10))], max_parallel=1, timeout=0.1,
                      threads=pool)
    assert out["hung"].timed_out
    assert pool.idle == 0  # still busy with the abandoned call
    out2 = run_bounded([("next", lambda: "ok")], max_parallel=1, timeout=5, threads=pool)
    assert out2["next"].value == "ok" and pool.started == 2
    release.set()
    _wait_idle(pool, 2)


def test_idle_threads_end_after_their_idle_time_and_at_most_max_idle_wait() -> None:
    pool = Workers(max_idle=2, idle_seconds=0.2)
    barrier = threading.Barrier(3, timeout=5)
    run_bounded([(i, barrier.wait) for i in range(3)], max_parallel=3, timeout=5, threads=pool)
    _wait_idle(pool, 2)  # the third thread ended instead of waiting
    _wait_idle(pool, 0)  # and the two idle ones end after 0.2 s
    out = run_bounded([("again", lambda: 1)], max_parallel=1, timeout=5, threads=pool)
    assert out["again"].value == 1 and pool.started == 4


def test_a_job_that_raises_does_not_kill_its_worker() -> None:
    pool = Workers()
    done = threading.Event()

    def bad() -> None:
        raise RuntimeError("boom")

    pool.submit(bad)
    _wait_idle(pool, 1)
    pool.submit(done.set)
    assert done.wait(5) and pool.started == 1
