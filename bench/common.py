"""Timing, ceilings and result files shared by the benchmarks (format: bench/results/README.md)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# A busy-wait kernel queued before each timed call keeps the GPU occupied while
# the host launches it, so the events measure device time, not Python launch
# overhead (serving runs these kernels inside CUDA graphs). ~100 us at 2 GHz.
_HOST_AHEAD_CYCLES = 200_000


def median_ms(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median device time over `iters` runs of `fn`, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        torch.cuda._sleep(_HOST_AHEAD_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def copy_ceiling_tbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    del src, dst
    return 2 * num_bytes / (ms * 1e-3) / 1e12


def gemm_ceiling_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, warmup=3, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str:
    """HEAD of the checkout; where the tree was copied without .git (the GPU machine), the
    caller passes it as ATTN_BACKEND_GIT_COMMIT."""
    if os.environ.get("ATTN_BACKEND_GIT_COMMIT"):
        return os.environ["ATTN_BACKEND_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_tag() -> str:
    name = torch.cuda.get_device_name()
    for tag in ("h200", "h100", "a100", "b200", "l40s"):
        if tag in name.lower():
            return tag
    return name.lower().replace(" ", "_")


def write_results(benchmark: str, unit: str, ceiling: dict, rows: list[dict], out_dir: Path,
                  notes: list[str] | None = None) -> Path:
    date = datetime.date.today().isoformat()
    result = {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": date,
        "git_commit": git_commit(),
        "command": os.environ.get("ATTN_BACKEND_BENCH_COMMAND")
        or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "unit": unit,
        "ceiling": ceiling,
        "rows": rows,
    }
    if notes:
        result["notes"] = notes
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{date}-{gpu_tag()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def format_table(result_rows: list[dict], unit: str) -> str:
    peers = sorted({p for row in result_rows for p in row.get("peers", {})})
    header = ["case", "ours"] + peers
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in result_rows:
        cells = [row["case"], f"{row['ours']:.3f}"]
        cells += [f"{row['peers'][p]:.3f}" if p in row.get("peers", {}) else "-" for p in peers]
        lines.append(" | ".join(cells))
    return f"({unit})\n" + "\n".join(lines)
