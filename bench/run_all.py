"""The benchmark suite: every kernel benchmark on the GPU, results as JSON (+ PNG) and a table.

    python -m bench.run_all [--out DIR] [--only kv_write,decode,prefill,mla_decode]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import bench_decode, bench_kv_write, bench_mla, bench_prefill
from .common import (RESULTS_DIR, copy_ceiling_tbs, format_table, gemm_ceiling_tflops,
                     write_results)

BENCHMARKS = {"decode": bench_decode, "kv_write": bench_kv_write, "prefill": bench_prefill,
              "mla_decode": bench_mla}
# The default suite (mla_decode too: the MLA kernel passed its first H200 run, 2026-12-01).
DEFAULT_BENCHMARKS = ("decode", "kv_write", "prefill", "mla_decode")


def measure_ceiling(kind: str) -> dict:
    """The ceiling a benchmark's ratios are taken against, measured in this run."""
    if kind == "gemm":
        return {"name": "bf16 GEMM 8192^3 (torch.matmul)", "unit": "TFLOP/s",
                "value": round(gemm_ceiling_tflops(), 1)}
    return {"name": "device-to-device copy", "unit": "TB/s", "value": round(copy_ceiling_tbs(), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", default=",".join(DEFAULT_BENCHMARKS),
                        help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attn_backend benchmarks need a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
    ceilings: dict[str, dict] = {}
    summaries = []
    for name in names:
        started = time.perf_counter()
        module = BENCHMARKS[name]
        kind = getattr(module, "CEILING", "copy")
        if kind not in ceilings:
            ceilings[kind] = measure_ceiling(kind)
        ceiling = ceilings[kind]
        unit, rows, notes = module.run()
        path = write_results(name, unit, ceiling, rows, args.out, notes)
        if hasattr(module, "plot"):
            module.plot(rows, ceiling["value"], path.with_suffix(".png"))
        summaries.append(f"== {name} ({time.perf_counter() - started:.0f} s) -> {path}\n"
                         f"ceiling {ceiling['name']}: {ceiling['value']} {ceiling['unit']}\n"
                         + format_table(rows, unit)
                         + "".join(f"\nnote: {note}" for note in notes))
    print("\n\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
