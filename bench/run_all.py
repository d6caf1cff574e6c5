"""The benchmark suite: every kernel benchmark on the GPU, results as JSON (+ PNG) and a table.

    python -m bench.run_all [--out DIR] [--only kv_write,decode]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import bench_decode, bench_kv_write
from .common import RESULTS_DIR, copy_ceiling_tbs, format_table, write_results

BENCHMARKS = {"decode": bench_decode, "kv_write": bench_kv_write}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attn_backend benchmarks need a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
    ceiling = {"name": "device-to-device copy", "value": round(copy_ceiling_tbs(), 3)}
    summaries = []
    for name in names:
        started = time.perf_counter()
        module = BENCHMARKS[name]
        unit, rows, notes = module.run()
        path = write_results(name, unit, ceiling, rows, args.out, notes)
        if hasattr(module, "plot"):
            module.plot(rows, ceiling["value"], path.with_suffix(".png"))
        summaries.append(f"== {name} ({time.perf_counter() - started:.0f} s) -> {path}\n"
                         f"ceiling {ceiling['name']}: {ceiling['value']} TB/s\n"
                         + format_table(rows, unit)
                         + "".join(f"\nnote: {note}" for note in notes))
    print("\n\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
