"""Timing, ceilings and result files shared by the benchmarks (format: bench/results/README.md)."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# A busy-wait kernel queued before each timed call keeps the GPU occupied while
# the host launches it, so the events measure device time, not Python launch
# overhead (serving runs these kernels inside CUDA graphs). ~100 us at 2 GHz.
_HOST_AHEAD_CYCLES = 200_000


# Warm-up lasts at least this long as well: after the host has kept the GPU idle (building
# inputs, compiling a peer) its clocks take tens of milliseconds to come back, and a case
# timed first after such a pause measured up to 2.5x slow in short-kernel cases.
_WARMUP_SECONDS = 0.1


def median_ms(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median device time over `iters` runs of `fn`, each timed with its own pair of CUDA events."""
    deadline = time.perf_counter() + _WARMUP_SECONDS
    done = 0
    while done < warmup or time.perf_counter() < deadline:
        fn()
        torch.cuda.synchronize()
        done += 1
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
    label = os.environ.get("ATTN_BACKEND_BENCH_FLASHINFER_LABEL")
    if label:
        rows = label_flashinfer_peers(rows, label)
        result["rows"] = rows
    if notes:
        result["notes"] = notes
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{date}-{gpu_tag()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def label_flashinfer_peers(rows: list[dict], label: str) -> list[dict]:
    """Rows whose FlashInfer peers (flashinfer, flashinfer_fa2, ...) carry `label` in their names
    (flashinfer_fa2_0.7.4): a second FlashInfer release timed beside the first
    (ATTN_BACKEND_BENCH_FLASHINFER_LABEL, scripts/gpu_flashinfer_peer.sh)."""
    def rename(name: str) -> str:
        return f"{name}_{label}" if name.startswith("flashinfer") else name

    return [{**row, "peers": {rename(name): value for name, value in row.get("peers", {}).items()}}
            for row in rows]


def format_table(result_rows: list[dict], unit: str) -> str:
    peers = sorted({p for row in result_rows for p in row.get("peers", {})})
    # Our other kernels timed in the same rows (e.g. bench_mla's ours_mma).
    ours_too = sorted({key for row in result_rows for key in row
                       if key.startswith("ours_") and key != "ours_us"})
    header = ["case", "ours"] + ours_too + peers
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in result_rows:
        cells = [row["case"], f"{row['ours']:.3f}"]
        cells += [f"{row[key]:.3f}" if key in row else "-" for key in ours_too]
        cells += [f"{row['peers'][p]:.3f}" if p in row.get("peers", {}) else "-" for p in peers]
        lines.append(" | ".join(cells))
    return f"({unit})\n" + "\n".join(lines)


def shuffled_pages(batch: int, kv_len: int, page_size: int, num_pages: int,
                   gen: torch.Generator) -> torch.Tensor:
    """int32 [batch, pages per request]: disjoint pages of the cache in random order."""
    pages_per_request = math.ceil(kv_len / page_size)
    order = torch.randperm(num_pages, generator=gen)[: batch * pages_per_request]
    return order.view(batch, pages_per_request).to(torch.int32)


def contiguous_kv(cache, pages: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, kv_heads, kv_len, dim] copies of each request's K and V (for unpaged peers)."""
    page_size = cache.page_size
    t = torch.arange(kv_len, device="cuda")
    slots = pages.cuda().long()[:, t // page_size] * page_size + t % page_size  # [batch, kv_len]
    k = cache.k.reshape(-1, cache.num_kv_heads, cache.head_dim_k)[slots]
    v = cache.v.reshape(-1, cache.num_kv_heads, cache.head_dim_v)[slots]
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


# Which peers the benchmarks run, from ATTN_BACKEND_BENCH_PEERS: "all" (the default), "none"
# (ours alone: before/after runs of our own builds, bench/before_after.py), or a comma list
# of "flashinfer", "sdpa", "flex", "flashmla" (the MLA benchmark's FlashMLA).
PEER_GROUPS = ("flashinfer", "sdpa", "flex", "flashmla")


def selected_peers() -> set[str]:
    value = os.environ.get("ATTN_BACKEND_BENCH_PEERS", "all")
    if value == "all":
        return set(PEER_GROUPS)
    chosen = {name for name in value.split(",") if name and name != "none"}
    unknown = chosen - set(PEER_GROUPS)
    if unknown:
        raise ValueError(f"ATTN_BACKEND_BENCH_PEERS: unknown peers {sorted(unknown)}; "
                         f"choose from all, none, {', '.join(PEER_GROUPS)}")
    return chosen


class OptionalPeers:
    """Peers that may be missing (FlashInfer, flex_attention); each one that cannot run says why
    once, in `notes`. Only the selected ones (selected_peers) are loaded."""

    def __init__(self):
        self.notes: list[str] = []
        chosen = selected_peers()
        if chosen != set(PEER_GROUPS):
            self.notes.append(f"peers run: {', '.join(sorted(chosen)) or 'none'} "
                              "(ATTN_BACKEND_BENCH_PEERS)")
        self.sdpa = "sdpa" in chosen
        self.flashinfer = None
        if "flashinfer" in chosen:
            try:
                import flashinfer
                self.flashinfer = flashinfer
                self.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
                self.notes.append(f"flashinfer {getattr(flashinfer, '__version__', '?')}")
            except Exception as error:  # noqa: BLE001 - reported in the results
                self.notes.append(f"flashinfer not run: {type(error).__name__}: {error}")
        self.flex = None
        self.flex_seconds = 0.0
        if "flex" in chosen:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                self.flex = torch.compile(flex_attention, dynamic=False)
                self.create_block_mask = create_block_mask
            except Exception as error:  # noqa: BLE001
                self.notes.append(f"flex_attention not run: {type(error).__name__}: {error}")

    @property
    def contiguous(self) -> bool:
        """Whether any peer needs the contiguous copies of K/V."""
        return self.sdpa or self.flex is not None

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def bench_kv_dtypes() -> list:
    """The cache dtypes a kernel benchmark runs (KV_DTYPE_NAMES, in order): all, or those whose
    tags ATTN_BACKEND_BENCH_KV_DTYPES lists (e.g. `bf16` for a quicker run)."""
    wanted = os.environ.get("ATTN_BACKEND_BENCH_KV_DTYPES")
    if not wanted:
        return list(KV_DTYPE_NAMES)
    tags = [t.strip() for t in wanted.split(",") if t.strip()]
    unknown = [t for t in tags if t not in KV_DTYPE_NAMES.values()]
    if unknown:
        raise ValueError(f"ATTN_BACKEND_BENCH_KV_DTYPES names {unknown}; known: "
                         f"{', '.join(KV_DTYPE_NAMES.values())}")
    return [dtype for dtype, tag in KV_DTYPE_NAMES.items() if tag in tags]


# The cache dtypes the kernel benchmarks run, in order, and their case-name tags; FP8 rows
# read their cache with these K and V scales (powers of two: values stay in range).
KV_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4m3"}
FP8_SCALES = (0.5, 2.0)


def random_kv_buffers(num_slots: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype):
    """SGLang-layout K and V buffers [num_slots, heads, dim] of random bf16 values cast to
    `kv_dtype`, and the scale keywords of a cache over them (only for FP8: an older build's
    `from_sglang`, the before build of a before/after run, takes none)."""
    k = torch.randn(num_slots, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES)) if kv_dtype.itemsize == 1 else {}
    return k.to(kv_dtype), v.to(kv_dtype), scales


def paged_view(k_buffer, v_buffer, scales: dict, page_size: int, batch: int, kv_len: int, gen):
    """The buffers as a paged cache of `page_size`, `batch` requests of `kv_len` keys on
    shuffled pages, and their block table: (cache, pages [batch, pages per request], table)."""
    from attn_backend import PagedKVCache, PageTable

    cache = PagedKVCache.from_sglang(k_buffer, v_buffer, page_size, **scales)
    pages = shuffled_pages(batch, kv_len, page_size, cache.num_pages, gen)
    return cache, pages, PageTable.from_block_table(pages.cuda())
