"""Summarise a torch-profiler chrome trace: GPU kernel time and CPU op time by name.

    python -m bench.trace_summary TRACE.json[.gz] [--top 25] [--match SUBSTRING]

Used on end-to-end runs (`sglang.benchmark.one_batch --profile`) to see where a
step's time goes: which kernels, and how much host work precedes each replay.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="CPU ops containing this (python functions)")
    args = parser.parse_args()
    events = [e for e in load(args.trace) if e.get("ph") == "X"]
    for category, title in (("kernel", "GPU kernels"), ("cpu_op", "CPU ops"),
                            ("python_function", "Python functions")):
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for event in events:
            if event.get("cat") == category and args.match in event["name"]:
                totals[event["name"][:90]] += event.get("dur", 0)
                counts[event["name"][:90]] += 1
        print(f"== {title}: {sum(totals.values()) / 1e3:.2f} ms in {sum(counts.values())} events")
        for name, us in totals.most_common(args.top):
            print(f"{us / 1e3:9.3f} ms {counts[name]:6d}x  {name}")


if __name__ == "__main__":
    main()
