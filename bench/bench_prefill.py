"""Paged prefill / append throughput: ours against FlashInfer (fa2, fa3), cuDNN/flash SDPA, flex.

TFLOP/s = 2 * (head_dim_qk + head_dim_vo) * num_qo_heads * (query, key) pairs that the causal
mask leaves visible, over the median time: masked work is not counted. The cache is one
SGLang-layout allocation viewed with page size 16 or 1, each request's pages shuffled;
FlashInfer reads the very same buffers through its own CSR page table. The SDPA and flex peers
get the same K/V gathered into contiguous [batch, kv_heads, kv_len, 128] tensors, with the
causal mask aligned to the bottom right (the queries are the last tokens) as ours is.

Every shape runs with a bf16 cache and with an FP8 (e4m3) cache with per-tensor K and V
scales (`_fp8e4m3_` in the case name); on FP8 rows FlashInfer reads the same FP8 buffers with
the same scales, and the contiguous peers do not run.
"""

from __future__ import annotations

import time
import traceback

import torch

import attn_backend
from attn_backend import PagedPrefill

from .common import (FP8_SCALES, KV_DTYPE_NAMES, OptionalPeers, bench_kv_dtypes, contiguous_kv,
                     median_ms, paged_view, random_kv_buffers)

CEILING = "gemm"
NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
# (batch, q_len, kv_len): one 8k prefill, four 4k prefills, 16 extends of 512 on 4k prefixes,
# and 64 verification-sized extends of 4, 8 and 16 tokens on 4k contexts (memory-bound: the
# short-query kernel; 16, 32 and 64 packed rows per request and kv head at GQA 32/8).
SHAPES = ((1, 8192, 8192), (4, 4096, 4096), (16, 512, 4608), (64, 4, 4096), (64, 8, 4096),
          (64, 16, 4096))
PAGE_SIZES = (16, 1)
FLEX_SECONDS_BUDGET = 240.0
TIMING_NOTE = ("Times are device times (a busy-wait kernel queued before each timed call keeps "
               "Python launch overhead out). TFLOP/s counts only the unmasked (query, key) pairs.")


def case_name(batch, q_len, kv_len, page_size, kv_dtype=DTYPE):
    return (f"b{batch}_q{q_len}_kv{kv_len}_h{NUM_QO_HEADS}-{NUM_KV_HEADS}_d{HEAD_DIM}_"
            f"{KV_DTYPE_NAMES[kv_dtype]}_p{page_size}_causal")


def visible_pairs(batch, q_len, kv_len):
    """Causal pairs: query i (position kv_len - q_len + i) sees kv_len - q_len + i + 1 keys."""
    prefix = kv_len - q_len
    return batch * (q_len * prefix + q_len * (q_len + 1) // 2)


def flops(batch, q_len, kv_len):
    return 2 * (HEAD_DIM + HEAD_DIM) * NUM_QO_HEADS * visible_pairs(batch, q_len, kv_len)


class Peers(OptionalPeers):
    """The optional peers, and how each runs this benchmark's case."""

    def flashinfer_prefill(self, backend, cache, pages, q_len, kv_len, q):
        batch, pages_per_request = pages.shape
        page_size = cache.page_size
        wrapper = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend=backend)
        qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * q_len
        kv_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * pages_per_request
        last = torch.full((batch,), kv_len - (pages_per_request - 1) * page_size,
                          dtype=torch.int32, device="cuda")
        wrapper.plan(qo_indptr, kv_indptr, pages.reshape(-1).cuda(), last, NUM_QO_HEADS,
                     NUM_KV_HEADS, HEAD_DIM, page_size, causal=True, q_data_type=DTYPE,
                     kv_data_type=cache.dtype)
        out = torch.empty_like(q)
        kv = (cache.k, cache.v)
        if cache.k.element_size() != 1:  # 16-bit (also on builds without FP8 support)
            return lambda: wrapper.run(q, kv, out=out), out
        k_scale, v_scale = FP8_SCALES
        return lambda: wrapper.run(q, kv, out=out, k_scale=k_scale, v_scale=v_scale), out


def _contiguous_peers(peers, batch, q_len, kv_len, cache, pages, q, iters) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    timings = {}
    k, v = contiguous_kv(cache, pages, kv_len)
    q4 = q.view(batch, q_len, NUM_QO_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    # Equal lengths: plain is_causal (top-left = bottom-right); an extend needs the bottom right.
    causal = dict(is_causal=True) if q_len == kv_len else \
        dict(attn_mask=causal_lower_right(q_len, kv_len))
    sdpa_backends = (("sdpa_cudnn_contiguous", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa_flash_contiguous", SDPBackend.FLASH_ATTENTION)) if peers.sdpa else ()
    for name, backend in sdpa_backends:
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q4, k, v, enable_gqa=True, **causal)
                fn()
                timings[name] = median_ms(fn, iters=iters)
        except Exception as error:  # noqa: BLE001
            peers.note_once(f"{name} not run for b{batch}_q{q_len}_kv{kv_len}: "
                            f"{type(error).__name__}: {str(error)[:160]}")
    if peers.flex is not None and peers.flex_seconds < FLEX_SECONDS_BUDGET:
        started = time.perf_counter()
        try:
            offset = kv_len - q_len
            block_mask = peers.create_block_mask(
                lambda b, h, q_idx, kv_idx: q_idx + offset >= kv_idx, None, None, q_len, kv_len,
                device="cuda")
            fn = lambda: peers.flex(q4, k, v, block_mask=block_mask, enable_gqa=True)  # noqa: E731
            fn()
            timings["flex_attention_contiguous"] = median_ms(fn, iters=iters)
        except Exception as error:  # noqa: BLE001
            peers.note_once(f"flex_attention failed: {type(error).__name__}: "
                            f"{traceback.format_exception_only(error)[-1][:200]}")
        peers.flex_seconds += time.perf_counter() - started
    elif peers.flex is not None:
        peers.note_once(f"flex_attention skipped after {FLEX_SECONDS_BUDGET:.0f} s of compiling")
    del k, v
    return timings


def run() -> tuple[str, list[dict], list[str]]:
    attn_backend.set_debug_checks(False)
    peers = Peers()
    gen = torch.Generator().manual_seed(0)
    rows = []
    max_tokens = max(b * q for b, q, _ in SHAPES)
    for kv_dtype in bench_kv_dtypes():
        try:
            prefill = PagedPrefill(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                                   head_dim=HEAD_DIM, dtype=DTYPE, kv_dtype=kv_dtype,
                                   device="cuda", max_batch_size=max(b for b, _, _ in SHAPES),
                                   max_num_tokens=max_tokens)
        except (TypeError, ValueError) as error:  # an older build (a before/after run)
            peers.note_once(f"{KV_DTYPE_NAMES[kv_dtype]} rows not run: {error}"[:300])
            continue
        for batch, q_len, kv_len in SHAPES:
            rows += _shape_rows(peers, prefill, kv_dtype, batch, q_len, kv_len, gen)
            torch.cuda.empty_cache()
    return "TFLOP/s", rows, peers.notes + [TIMING_NOTE]


def _shape_rows(peers, prefill, kv_dtype, batch, q_len, kv_len, gen) -> list[dict]:
    """The rows of one shape and cache dtype, one per page size."""
    k_buffer, v_buffer, scales = random_kv_buffers(batch * kv_len + 64 * 16, NUM_KV_HEADS,
                                                   HEAD_DIM, kv_dtype)
    q = torch.randn(batch * q_len, NUM_QO_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    work = flops(batch, q_len, kv_len)
    contiguous = None if kv_dtype == DTYPE else {}  # SDPA/flex read 16-bit K/V only
    rows = []
    for page_size in PAGE_SIZES:
        cache, pages, table = paged_view(k_buffer, v_buffer, scales, page_size, batch, kv_len,
                                         gen)
        prefill.plan([q_len * r for r in range(batch + 1)], [kv_len] * batch)
        out = torch.empty_like(q)
        name_of_case = case_name(batch, q_len, kv_len, page_size, kv_dtype)
        timings = {"ours": median_ms(lambda: prefill.run(q, cache, table, out=out), iters=30)}
        if peers.flashinfer is not None:
            for name, backend in (("flashinfer_fa2", "fa2"), ("flashinfer_fa3", "fa3")):
                try:
                    fn, peer_out = peers.flashinfer_prefill(backend, cache, pages, q_len,
                                                            kv_len, q)
                    timings[name] = median_ms(fn, iters=30)
                    diff = (peer_out.float() - out.float()).abs().max().item()
                    if diff > 0.05:
                        peers.note_once(f"{name} and ours differ by {diff:.3g} at {name_of_case}")
                except Exception as error:  # noqa: BLE001
                    peers.note_once(f"{name} failed ({KV_DTYPE_NAMES[kv_dtype]}): "
                                    f"{type(error).__name__}: {error}"[:300])
        if contiguous is None:  # SDPA/flex: once per shape, the layout has no pages
            contiguous = _contiguous_peers(peers, batch, q_len, kv_len, cache, pages, q, 30) \
                if peers.contiguous else {}
        timings.update(contiguous)
        tflops = {name: work / (ms * 1e-3) / 1e12 for name, ms in timings.items()}
        rows.append({
            "case": name_of_case,
            "ours": round(tflops.pop("ours"), 2),
            "peers": {name: round(value, 2) for name, value in sorted(tflops.items())},
            "ours_us": round(timings["ours"] * 1e3, 1),
        })
    return rows


def plot(rows, ceiling_tflops, path, device: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["ours", "flashinfer_fa2", "flashinfer_fa3", "sdpa_cudnn_contiguous",
             "sdpa_flash_contiguous", "flex_attention_contiguous"]
    colors = ["tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:olive", "tab:purple"]
    builds = sorted({p for row in rows for p in row["peers"] if p.startswith("attn_backend_")})
    names += builds  # earlier builds of ours (bench/before_after.py)
    colors += ["tab:gray"] * len(builds)
    # A second FlashInfer release merged in (bench/merge_peers.py names it flashinfer_<kind>_<version>).
    releases = sorted({p for row in rows for p in row["peers"]
                       if p.startswith("flashinfer_") and p not in names})
    palette = ["tab:brown", "tab:pink", "tab:orange"]
    names += releases
    colors += [palette[i % len(palette)] for i in range(len(releases))]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 4.5))
    width = 0.8 / len(names)
    for i, (name, color) in enumerate(zip(names, colors)):
        values = [row["ours"] if name == "ours" else row["peers"].get(name, 0.0) for row in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=name, color=color)
    ax.axhline(ceiling_tflops, color="black", linewidth=1, label="bf16 GEMM ceiling")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels([row["case"].replace("_h32-8_d128_", "\n").replace("_causal", "")
                        for row in rows], fontsize=7)
    ax.set_ylabel("TFLOP/s (unmasked work)")
    ax.set_title(f"Paged prefill, causal, GQA {NUM_QO_HEADS}/{NUM_KV_HEADS}, d{HEAD_DIM}, bf16 q, "
                 f"bf16 and fp8e4m3 caches "
                 f"({device or torch.cuda.get_device_name()})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
