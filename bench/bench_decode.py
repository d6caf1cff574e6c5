"""Paged decode bandwidth: ours against FlashInfer, cuDNN/flash SDPA and flex_attention.

Bandwidth = (K and V bytes read + query and output bytes) / median time. The
cache is one SGLang-layout allocation ([slots, kv_heads, 128] for K and for V,
random values) viewed with page size 16 or 1; each request's pages are
shuffled. FlashInfer reads the very same buffers through its own CSR page
table. The SDPA and flex peers get the same K/V gathered into contiguous
[batch, kv_heads, kv_len, 128] tensors (no paging), the best case for them.

Every shape runs with a bf16 cache and with an FP8 (e4m3) cache with per-tensor K and V
scales (`_fp8e4m3_` in the case name; half the K/V bytes); on FP8 rows FlashInfer reads the
same FP8 buffers with the same scales, and the contiguous peers do not run.
"""

from __future__ import annotations

import time
import traceback

import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache

from .common import (FP8_SCALES, KV_DTYPE_NAMES, OptionalPeers, bench_kv_dtypes, contiguous_kv,
                     median_ms, paged_view, random_kv_buffers, shuffled_pages)

NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
BATCHES = (1, 16, 64, 256)
KV_LENS = (512, 4096, 32768)
PAGE_SIZES = (16, 1)
FLEX_SECONDS_BUDGET = 240.0
TIMING_NOTE = ("Times are device times: a busy-wait kernel queued before each timed call keeps "
               "Python launch overhead out (serving replays decode in CUDA graphs).")




def case_name(batch, kv_len, page_size, kv_dtype=DTYPE):
    return (f"b{batch}_kv{kv_len}_h{NUM_QO_HEADS}-{NUM_KV_HEADS}_d{HEAD_DIM}_"
            f"{KV_DTYPE_NAMES[kv_dtype]}_p{page_size}")


def make_problem(batch, kv_len, page_size, gen, kv_dtype=DTYPE):
    """Random K/V for `batch` requests of `kv_len` tokens on shuffled pages, and a query (an
    FP8 cache holds the random values cast, read with scale 1)."""
    k_buffer = torch.randn(batch * kv_len + 1024, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE,
                           device="cuda")
    v_buffer = torch.randn_like(k_buffer)
    cache = PagedKVCache.from_sglang(k_buffer.to(kv_dtype), v_buffer.to(kv_dtype), page_size)
    pages = shuffled_pages(batch, kv_len, page_size, cache.num_pages, gen)
    q = torch.randn(batch, NUM_QO_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return cache, pages, q


def make_decode(max_batch_size, kv_dtype=DTYPE, **options):
    return PagedDecode(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                       dtype=DTYPE, kv_dtype=kv_dtype, device="cuda",
                       max_batch_size=max_batch_size, **options)


def kv_bytes(batch, kv_len, kv_dtype=DTYPE):
    return 2 * batch * kv_len * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize


class Peers(OptionalPeers):
    """The optional peers, and how each runs this benchmark's case."""

    def flashinfer_decode(self, use_tensor_cores, cache, pages, kv_len, q):
        batch, pages_per_request = pages.shape
        page_size = cache.page_size
        wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=use_tensor_cores)
        indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * pages_per_request
        last = torch.full((batch,), kv_len - (pages_per_request - 1) * page_size,
                          dtype=torch.int32, device="cuda")
        wrapper.plan(indptr, pages.reshape(-1).cuda(), last, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM,
                     page_size, q_data_type=DTYPE, kv_data_type=cache.dtype)
        out = torch.empty_like(q)
        kv = (cache.k, cache.v)
        if cache.k.element_size() != 1:  # 16-bit (also on builds without FP8 support)
            return lambda: wrapper.run(q, kv, out=out)
        k_scale, v_scale = FP8_SCALES
        return lambda: wrapper.run(q, kv, out=out, k_scale=k_scale, v_scale=v_scale)


def run() -> tuple[str, list[dict], list[str]]:
    attn_backend.set_debug_checks(False)
    peers = Peers()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kv_dtype in bench_kv_dtypes():
        try:
            decode = make_decode(max(BATCHES), kv_dtype)
        except (TypeError, ValueError) as error:  # an older build (a before/after run)
            peers.note_once(f"{KV_DTYPE_NAMES[kv_dtype]} rows not run: {error}"[:300])
            continue
        for kv_len in KV_LENS:
            for batch in BATCHES:
                rows += _shape_rows(peers, decode, kv_dtype, batch, kv_len, gen)
                torch.cuda.empty_cache()
    return "TB/s", rows, peers.notes + [TIMING_NOTE]


def _shape_rows(peers, decode, kv_dtype, batch, kv_len, gen) -> list[dict]:
    """The rows of one shape and cache dtype, one per page size."""
    k_buffer, v_buffer, scales = random_kv_buffers(batch * kv_len + 64 * 16, NUM_KV_HEADS,
                                                   HEAD_DIM, kv_dtype)
    q = torch.randn(batch, NUM_QO_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    moved = kv_bytes(batch, kv_len, kv_dtype) + 2 * q.numel() * q.element_size()
    iters = 20 if moved > (4 << 30) else 50
    contiguous = None if kv_dtype == DTYPE else {}  # SDPA/flex read 16-bit K/V only
    rows = []
    for page_size in PAGE_SIZES:
        cache, pages, table = paged_view(k_buffer, v_buffer, scales, page_size, batch, kv_len,
                                         gen)
        decode.plan([kv_len] * batch)
        out = torch.empty_like(q)
        timings = {"ours": median_ms(lambda: decode.run(q, cache, table, out=out), iters=iters)}
        if peers.flashinfer is not None:
            for name, tensor_cores in (("flashinfer", True), ("flashinfer_cuda_cores", False)):
                try:
                    fn = peers.flashinfer_decode(tensor_cores, cache, pages, kv_len, q)
                    timings[name] = median_ms(fn, iters=iters)
                except Exception as error:  # noqa: BLE001
                    peers.note_once(f"{name} failed: {type(error).__name__}: {error}"[:300])
        if contiguous is None:  # SDPA/flex: once per shape, the layout has no pages
            contiguous = _contiguous_peers(peers, batch, kv_len, cache, pages, q, iters) \
                if peers.contiguous else {}
        timings.update(contiguous)
        tbs = {name: moved / (ms * 1e-3) / 1e12 for name, ms in timings.items()}
        rows.append({
            "case": case_name(batch, kv_len, page_size, kv_dtype),
            "ours": round(tbs.pop("ours"), 4),
            "peers": {name: round(value, 4) for name, value in sorted(tbs.items())},
            "ours_us": round(timings["ours"] * 1e3, 2),
        })
    return rows


def _contiguous_peers(peers, batch, kv_len, cache, pages, q, iters) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timings = {}
    try:
        k, v = contiguous_kv(cache, pages, kv_len)
    except torch.OutOfMemoryError:
        peers.note_once(f"SDPA/flex peers skipped where the contiguous copy did not fit "
                        f"(first: b{batch} kv{kv_len})")
        return timings
    q4 = q.unsqueeze(2)  # [batch, heads, 1, dim]
    sdpa_backends = (("sdpa_cudnn_contiguous", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa_flash_contiguous", SDPBackend.FLASH_ATTENTION)) if peers.sdpa else ()
    for name, backend in sdpa_backends:
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q4, k, v, enable_gqa=True)
                fn()
                timings[name] = median_ms(fn, iters=iters)
        except Exception as error:  # noqa: BLE001
            peers.note_once(f"{name} failed: {type(error).__name__}: {str(error)[:200]}")
    if peers.flex is not None and peers.flex_seconds < FLEX_SECONDS_BUDGET:
        started = time.perf_counter()
        try:
            fn = lambda: peers.flex(q4, k, v, enable_gqa=True)  # noqa: E731
            fn()
            timings["flex_attention_contiguous"] = median_ms(fn, iters=iters)
        except torch.OutOfMemoryError:
            peers.note_once(f"flex_attention_contiguous not run at b{batch}_kv{kv_len}: out of GPU "
                            "memory")
        except Exception as error:  # noqa: BLE001
            peers.note_once(f"flex_attention failed: {type(error).__name__}: "
                            f"{traceback.format_exception_only(error)[-1][:200]}")
        peers.flex_seconds += time.perf_counter() - started
    elif peers.flex is not None:
        peers.note_once(f"flex_attention skipped after {FLEX_SECONDS_BUDGET:.0f} s of compiling")
    del k, v
    return timings


def plot(rows, ceiling_tbs, path, device: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [name for name in KV_DTYPE_NAMES.values()
             if any(f"_{name}_p" in row["case"] for row in rows)]
    fig, grid = plt.subplots(len(kinds), len(BATCHES), figsize=(5 * len(BATCHES), 4.2 * len(kinds)),
                             sharey=True, squeeze=False)
    styles = {"ours": ("tab:red", "-"), "flashinfer": ("tab:blue", "-"),
              "flashinfer_cuda_cores": ("tab:cyan", "--"), "sdpa_cudnn_contiguous": ("tab:green", ":"),
              "sdpa_flash_contiguous": ("tab:olive", ":"),
              "flex_attention_contiguous": ("tab:purple", ":")}
    for axes, kind in zip(grid, kinds):
        for ax, batch in zip(axes, BATCHES):
            for page_size, marker in ((16, "o"), (1, "x")):
                series = {}
                for row in rows:
                    if not (row["case"].startswith(f"b{batch}_")
                            and row["case"].endswith(f"_{kind}_p{page_size}")):
                        continue
                    kv_len = int(row["case"].split("_kv")[1].split("_")[0])
                    series.setdefault("ours", []).append((kv_len, row["ours"]))
                    for name, value in row["peers"].items():
                        if page_size == 1 and name.endswith("_contiguous"):
                            continue  # contiguous peers do not depend on the page size
                        series.setdefault(name, []).append((kv_len, value))
                for name, points in series.items():
                    color, line = styles.get(name, ("gray", "-"))
                    xs, ys = zip(*sorted(points))
                    label = name if name.endswith("_contiguous") else f"{name} p{page_size}"
                    ax.plot(xs, ys, line, color=color, marker=marker, label=label,
                            alpha=1.0 if page_size == 16 else 0.6)
            ax.axhline(ceiling_tbs, color="black", linewidth=1, label="copy ceiling")
            ax.set_xscale("log", base=2)
            ax.set_title(f"batch {batch}, {kind} cache")
            ax.set_xlabel("kv_len")
        axes[0].set_ylabel("TB/s (K+V bytes / time)")
        axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Paged decode, GQA {NUM_QO_HEADS}/{NUM_KV_HEADS}, d{HEAD_DIM}, bf16 queries "
                 f"({device or torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
