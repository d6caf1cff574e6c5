"""Combine complete runs of one benchmark (same commit, same GPU) into one result: per cell
(ours and each peer of each case), the best of the runs.

    python -m bench.best_of_runs RUN1.json RUN2.json [...] --out bench/results/NAME.json

For a GPU shared with other work, where a cell now and then measures several times slower
(every implementation alike) while the rest of the run is steady: the best of complete runs
drops those cells without favouring anyone. Each cell whose runs differ by more than
`--spread` is listed in the notes with every run's value; the PNG is redrawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .run_all import BENCHMARKS


def combine(runs: list[dict], spread: float) -> dict:
    first = runs[0]
    for key in ("benchmark", "git_commit", "device", "unit"):
        values = {run[key] for run in runs}
        if len(values) > 1:
            raise ValueError(f"runs differ in {key}: {sorted(values)}")
    by_case = [{row["case"]: row for row in run["rows"]} for run in runs]
    rows, uneven = [], []
    for row in first["rows"]:
        case = row["case"]
        same = [cases[case] for cases in by_case if case in cases]
        best_ours = max(same, key=lambda r: r["ours"])
        merged = dict(best_ours)  # with its time fields (ours_us)
        peers = sorted({p for r in same for p in r.get("peers", {})})
        merged["peers"] = {p: max(r["peers"][p] for r in same if p in r.get("peers", {}))
                           for p in peers}
        rows.append(merged)
        for name, values in [("ours", [r["ours"] for r in same])] + [
                (p, [r["peers"][p] for r in same if p in r.get("peers", {})]) for p in peers]:
            if min(values) < (1 - spread) * max(values):
                uneven.append(f"{case} {name}: " + " / ".join(f"{v:.3f}" for v in values))
    result = dict(first)
    result["rows"] = rows
    result["ceiling"] = dict(first["ceiling"], value=max(run["ceiling"]["value"] for run in runs))
    result["command"] = " ; ".join(dict.fromkeys(run["command"] for run in runs)) + \
        f" ({len(runs)} complete runs, best per cell: python -m bench.best_of_runs)"
    notes = list(dict.fromkeys(n for run in runs for n in run.get("notes", [])))
    notes.append(f"Best of {len(runs)} complete runs per cell (ceiling too); cells whose runs "
                 f"differ by more than {spread:.0%} (run values in order): "
                 + ("; ".join(uneven) if uneven else "none"))
    result["notes"] = notes
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spread", type=float, default=0.2)
    args = parser.parse_args(argv)
    result = combine([json.loads(path.read_text()) for path in args.runs], args.spread)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    module = BENCHMARKS.get(result["benchmark"])
    if module is not None and hasattr(module, "plot"):
        module.plot(result["rows"], result["ceiling"]["value"], args.out.with_suffix(".png"),
                    device=result["device"])
    for note in result["notes"][-1:]:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
