"""Summarise a torch-profiler chrome trace: GPU kernel time and CPU op time by name.

    python -m bench.trace_summary TRACE.json[.gz] [--top 25] [--match SUBSTRING]

Used on end-to-end runs (`sglang.benchmark.one_batch --profile`, `bench.e2e_vllm
--profile-steps N`) to see where a step's time goes: which kernels, and how much host work
precedes each replay.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json

CATEGORIES = (("kernel", "GPU kernels"), ("cpu_op", "CPU ops"),
              ("python_function", "Python functions"))


def load(path: str) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def summarize(events: list[dict], top: int = 25, match: str = "") -> list[str]:
    """The summary's lines: for each category its total time and event count, then its `top`
    names by time (names containing `match` only)."""
    lines = []
    complete = [e for e in events if e.get("ph") == "X"]
    for category, title in CATEGORIES:
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for event in complete:
            if event.get("cat") == category and match in event["name"]:
                totals[event["name"][:90]] += event.get("dur", 0)
                counts[event["name"][:90]] += 1
        lines.append(f"== {title}: {sum(totals.values()) / 1e3:.2f} ms in "
                     f"{sum(counts.values())} events")
        lines += [f"{us / 1e3:9.3f} ms {counts[name]:6d}x  {name}"
                  for name, us in totals.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="CPU ops containing this (python functions)")
    args = parser.parse_args()
    print("\n".join(summarize(load(args.trace), args.top, args.match)))


if __name__ == "__main__":
    main()
