"""Longer fuzzing than the test suite: the properties of tests/unit/test_fuzz_parsers.py with
random seeds and many more examples.

    .venv/bin/python bench/fuzz.py [--examples N] [--seconds S]

Each target runs until it has tried N examples or S seconds have passed; the first
counterexample is printed (shrunk) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.support import fuzz  # noqa: E402
from tests.unit import test_fuzz_parsers as edge  # noqa: E402


def run(name: str, strategy: Any, check: Callable[..., None], examples: int,
        seconds: float) -> int:
    """Batches of random examples until `examples` were tried or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    count = 0
    batch = 200

    @settings(max_examples=batch, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def target(args: Any) -> None:
        nonlocal count
        count += 1
        check(*args)

    while count < examples and time.monotonic() < deadline:
        try:
            target()
        except Exception as exc:  # a counterexample: hypothesis printed it
            print(f"{name}: FAILED after {count} examples: {type(exc).__name__}: {exc}")
            return 1
    print(f"{name}: {count} examples, no failure")
    return 0


def _multipart(data: bytes, ctype: str) -> None:
    with tempfile.TemporaryDirectory() as spool:
        fuzz.check_multipart(data, ctype, Path(spool))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    a = ap.parse_args()
    spool = Path(tempfile.mkdtemp(prefix="xdsi-fuzz-bench-"))
    targets = [
        ("envelope (mutated)", st.tuples(fuzz.mutated(fuzz.VALID_ENVELOPE)),
         fuzz.check_envelope),
        ("envelope (random bytes)", st.tuples(st.binary(max_size=4000)), fuzz.check_envelope),
        ("multipart", st.tuples(fuzz.mutated(fuzz.mtom_body()), st.just(fuzz.MTOM_TYPE)),
         _multipart),
        ("ebRIM", st.tuples(st.sampled_from(fuzz.EBRIM_ROOTS).flatmap(fuzz.ebrim_tree),
                            st.just(spool)), fuzz.check_ebrim),
        ("edge, plain SOAP", st.tuples(fuzz.mutated(fuzz.VALID_ENVELOPE),
                                       st.just("application/soap+xml")),
         edge.assert_edge_property),
        ("edge, MTOM", st.tuples(fuzz.mutated(fuzz.mtom_body()), st.just(fuzz.MTOM_TYPE)),
         edge.assert_edge_property),
    ]
    failures = sum(run(name, strategy, check, a.examples, a.seconds)
                   for name, strategy, check in targets)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
