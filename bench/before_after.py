"""A kernel change judged before/after: runs of one benchmark with the build before the change
and with the build after it, on the same machine in one GPU call (the runs alternating),
combined into one result.

    python -m bench.before_after --before B1.json B2.json --after A1.json A2.json \
        --label c66ed44 --out bench/results/decode-DATE-h200.json [--also PEERS.json]

Each side is the best of its runs per cell (bench/best_of_runs.py: a cell now and then
measures slow on a shared GPU, for every build alike). The result is the after side, with
the before side's figure of each case as the peer `attn_backend_<label>` (and the peers of
the `--also` runs, e.g. FlashInfer timed in the same call); the table printed last gives
after / before per case and marks the cases more than `--tolerance` below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .best_of_runs import combine
from .merge_peers import merge_peers
from .run_all import BENCHMARKS


def merge(before: dict, after: dict, label: str, also: list[dict]) -> dict:
    result = merge_peers(after, also)
    before_rows = {row["case"]: row for row in before["rows"]}
    for row in result["rows"]:
        if row["case"] in before_rows:
            row["peers"] = dict(sorted({**row["peers"], f"attn_backend_{label}":
                                        before_rows[row["case"]]["ours"]}.items()))
    result["notes"] = result["notes"] + [
        f"peer attn_backend_{label}: the build before the change, timed in the same GPU call "
        f"({before['command']})"]
    return result


def table(result: dict, label: str, tolerance: float) -> tuple[str, list[str]]:
    lines = [f"case | before ({label}) | after | after / before", "--- | --- | --- | ---"]
    below = []
    for row in result["rows"]:
        before = row["peers"].get(f"attn_backend_{label}")
        if before is None:
            continue
        ratio = row["ours"] / before
        mark = " **below**" if ratio < 1 - tolerance else ""
        if mark:
            below.append(row["case"])
        lines.append(f"{row['case']} | {before:.3f} | {row['ours']:.3f} | {ratio:.3f}{mark}")
    return "\n".join(lines), below


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", nargs="+", type=Path, required=True)
    parser.add_argument("--after", nargs="+", type=Path, required=True)
    parser.add_argument("--also", nargs="*", type=Path, default=[])
    parser.add_argument("--label", required=True, help="the before build's commit")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--spread", type=float, default=0.2,
                        help="list cells whose runs differ by more than this (best_of_runs)")
    args = parser.parse_args(argv)
    load = lambda paths: [json.loads(p.read_text()) for p in paths]  # noqa: E731
    before, after = combine(load(args.before), args.spread), combine(load(args.after), args.spread)
    result = merge(before, after, args.label, load(args.also))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    module = BENCHMARKS.get(result["benchmark"])
    if module is not None and hasattr(module, "plot"):
        module.plot(result["rows"], result["ceiling"]["value"], args.out.with_suffix(".png"),
                    device=result["device"])
    text, below = table(result, args.label, args.tolerance)
    print(f"== {result['benchmark']} ({result['unit']}), best of {len(args.before)} before / "
          f"{len(args.after)} after runs")
    print(text)
    print(f"cases more than {args.tolerance:.0%} below before: {', '.join(below) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
