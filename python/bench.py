"""What a request through the Python module costs over the same request from the Rust library.

Both send to the project's loopback mock (no latency of its own, in this process) through one
`APIJongler` on a fresh database with 4 keys: the Rust side through the library handle underneath it
(`_native.bench_library`, a loop of `Jongler::request` in one task, timed in Rust), the Python side
through `APIJongler.request`, timed in Python. Rounds alternate between the two so that both see the
same machine. Run it on a release build (`maturin develop --release`): `python python/bench.py`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from api_jongler import APIJongler, _native

GEMINI = "generativelanguage.googleapis.com"
ENDPOINT = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = json.dumps({"contents": [{"parts": [{"text": "Say hello."}]}]})
ROUNDS, PER_ROUND, WARM_UP = 10, 200, 200


def milliseconds(seconds: list, q: float) -> float:
    return 1000 * statistics.quantiles(seconds, n=100)[int(q) - 1] if q < 100 else 1000 * max(seconds)


def main() -> None:
    mock = _native.MockUpstream(latency=0.0)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "keys.ini").write_text(f"[{GEMINI}]\n" + "".join(f"key{i} = fake-bench-{i}\n" for i in range(4)))
        (root / "connectors").mkdir()
        fields = {"name": GEMINI, "host": "127.0.0.1", "port": mock.port, "protocol": "http"}
        (root / "connectors" / f"{GEMINI}.json").write_text(json.dumps(fields))
        jongler = APIJongler(GEMINI, config=root / "keys.ini", db=root / "pool.db", connectors_dir=root / "connectors")

        def python_side(count: int) -> list:
            timings = []
            for _ in range(count):
                started = time.perf_counter()
                jongler.request("POST", ENDPOINT, BODY)
                timings.append(time.perf_counter() - started)
            return timings

        def rust_side(count: int) -> list:
            return _native.bench_library(jongler._native, "POST", ENDPOINT, BODY, count)

        python_side(WARM_UP)
        rust_side(WARM_UP)
        python, rust = [], []
        for _ in range(ROUNDS):
            rust += rust_side(PER_ROUND)
            python += python_side(PER_ROUND)
    print(f"apijongler python bench: {len(rust)} requests from each side, loopback mock (no latency), 4 keys,")
    print(f"one process; Python {sys.version.split()[0]}")
    print(f"{'':16}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, timings in (("Rust library", rust), ("Python module", python)):
        print(f"{name:16}" + "".join(f"{milliseconds(timings, q):>7.3f} ms" for q in (50, 90, 99)))
    overhead = 1000 * (statistics.median(python) - statistics.median(rust))
    print(f"overhead (median): {overhead:.3f} ms per request (target: at most 0.3 ms)")


if __name__ == "__main__":
    main()
