"""MLA decode and verify (benchmark `mla_decode`): ours against FlashMLA and FlashInfer's MLA.

DeepSeek's latent cache: one row of 576 bf16 values per token (512 latent + 64 rope), one
allocation `[slots, 1, 576]` viewed with page size 64 or 1, each request's pages shuffled;
queries `[tokens, heads, 576]` (16 heads: DeepSeek-V3 at TP 8; 128: TP 1). Decode rows have
one query token per request, verify rows (`_q4`) four, causal. Bandwidth = (latent bytes read
+ query and output bytes) / median time, against the copy ceiling; each row also carries
TFLOP/s (2 (576 + 512) flops per visible (query head, key) pair), against the GEMM ceiling
where the heads make it compute-bound.

Peers on the identical cache: `flashmla` (the `flash_mla` package of the sgl-flash-mla wheel,
SGLang 0.5.23's pin, 10 MB, stable-ABI extensions; else sgl_kernel.flash_mla; page 64 only) and `flashinfer_mla` (BatchMLAPagedAttentionWrapper over strided
views of the latent and rope columns). A peer that is missing or fails says so in the notes.
Where our default is a warpgroup (wgmma) kernel, each row also times the mma.sync kernels
on the same inputs (`ours_mma`); on a 16-bit cache where it is not the seesaw kernel, the
seesaw one (`ours_seesaw`), and where it is, the 32-key warpgroup one (`ours_wgmma32`);
`kernel` names the configuration `ours` ran. The GPU
tests (tests/test_mla_gpu.py) check the latent kernels before this runs in scripts/gpu_check.sh.

FP8 rows (`_fp8e4m3_` in place of `_bf16_`; ATTN_BACKEND_BENCH_KV_DTYPES=bf16 leaves them out):
FP8_SHAPES with an e4m3 latent cache (the random rows cast, read with scale FP8_SCALE), half
the latent bytes; `vs_bf16_time` = the row's time over the bf16 row of the same shape in this
run. Peer `flashmla`: FlashMLA's dense FP8 path where the wheel has it (it takes FP8 queries:
the bf16 query quantised with the same scale, as SGLang's FlashMLA backend does); FlashInfer's
MLA wrapper is not run on FP8 caches.
"""

from __future__ import annotations

import torch

import attn_backend
from attn_backend import PagedKVCache, PagedPrefill, PageTable

from .common import (KV_DTYPE_NAMES, OptionalPeers, bench_kv_dtypes, median_ms, selected_peers,
                     shuffled_pages)

RANK, ROPE = 512, 64
DTYPE = torch.bfloat16
BATCHES = (1, 16, 64, 128)
KV_LENS = (1024, 4096, 32768)
HEADS = (16, 128)
PAGE_SIZES = (64, 1)
VERIFY_TOKENS = 4
VERIFY_SHAPES = ((16, 4096), (64, 4096))  # (batch, kv_len) with 4 draft tokens
# (batch, kv_len, heads, q_len) with an FP8 cache: the targets' shapes and both regimes.
FP8_SHAPES = ((64, 4096, 16, 1), (128, 4096, 16, 1), (64, 32768, 16, 1), (64, 4096, 128, 1),
              (1, 32768, 128, 1), (16, 4096, 16, VERIFY_TOKENS))
FP8_DTYPE = torch.float8_e4m3fn
FP8_SCALE = 0.5
TIMING_NOTE = ("Times are device times (a busy-wait kernel queued before each timed call keeps "
               "Python launch overhead out); bytes: the latent rows each request reads once.")


def case_name(batch, kv_len, heads, page_size, q_len=1, kv_dtype=DTYPE):
    tail = f"_q{q_len}" if q_len > 1 else ""
    tag = KV_DTYPE_NAMES[kv_dtype]
    return f"b{batch}_kv{kv_len}_h{heads}_mla{RANK}-{ROPE}_{tag}_p{page_size}{tail}"


def latent_bytes(batch, kv_len, kv_dtype=DTYPE):
    return batch * kv_len * (RANK + ROPE) * kv_dtype.itemsize


def flops(batch, kv_len, heads, q_len):
    """Causal: draft i of q_len (position kv_len - q_len + i) sees kv_len - q_len + i + 1 keys."""
    pairs = batch * (q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2)
    return 2 * (RANK + ROPE + RANK) * heads * pairs


class Peers(OptionalPeers):
    def __init__(self):
        super().__init__()
        self.flash_mla = None
        if "flashmla" in selected_peers():
            try:  # sgl-flash-mla (SGLang 0.5.23's pin), else sglang-kernel's older copy
                import flash_mla
                self.flash_mla, self.flash_mla_legacy_api = flash_mla, False
            except Exception as error:  # noqa: BLE001 - reported in the results
                try:
                    from sgl_kernel import flash_mla
                    self.flash_mla, self.flash_mla_legacy_api = flash_mla, True
                except Exception:  # noqa: BLE001
                    self.notes.append(f"flashmla not run: {type(error).__name__}: {error}"[:300])

    def flashmla(self, latent, pages, kv_len, q, q_len):
        """FlashMLA's decode over pages of 64 (q [batch, q_len, heads, 576]). An FP8 cache:
        its dense FP8 path, with the query quantised with the cache's scale (descale_q =
        descale_k = FP8_SCALE)."""
        batch = pages.shape[0]
        heads = q.shape[1]
        q4 = q.view(batch, q_len, heads, RANK + ROPE)
        seqlens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
        blocks = latent.view(-1, 64, 1, RANK + ROPE)
        table = pages.cuda()
        scale = (RANK + ROPE) ** -0.5
        fp8 = latent.element_size() == 1
        fp8_args = {}
        if fp8:
            q4 = (q4.float() / FP8_SCALE).to(latent.dtype)
            descale = torch.full((1,), FP8_SCALE, dtype=torch.float32, device="cuda")
            fp8_args = dict(descale_q=descale, descale_k=descale, is_fp8_kvcache=True)
        if self.flash_mla_legacy_api:  # sgl_kernel: the scheduler's metadata up front
            if fp8:
                raise NotImplementedError("this FlashMLA build's API takes no FP8 cache")
            metadata, splits = self.flash_mla.get_mla_metadata(seqlens, q_len * heads, 1)
            return lambda: self.flash_mla.flash_mla_with_kvcache(
                q4, blocks, table, seqlens, RANK, metadata, splits, softmax_scale=scale,
                causal=q_len > 1)
        # sgl-flash-mla: the metadata fills on the first call; SM90's dense kernels are its
        # "legacy" half.
        metadata, _ = self.flash_mla.get_mla_metadata()
        if fp8:  # its dense FP8 scheduler takes the metadata up front
            metadata.tile_scheduler_metadata, metadata.num_splits = \
                self.flash_mla.get_mla_decoding_metadata(seqlens, q_len * heads, 1,
                                                         is_fp8_kvcache=True, use_legacy=True)
        return lambda: self.flash_mla.flash_mla_with_kvcache(
            q4, blocks, table, seqlens, RANK, metadata, None, softmax_scale=scale,
            causal=q_len > 1, use_legacy=True, **fp8_args)

    def flashinfer_mla(self, latent, pages, page_size, kv_len, q, q_len):
        batch, pages_per_request = pages.shape
        heads = q.shape[1]
        wrapper = self.flashinfer.mla.BatchMLAPagedAttentionWrapper(self.workspace)
        rows = latent.view(-1, page_size, RANK + ROPE)
        qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
        kv_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per_request
        kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
        wrapper.plan(qo_indptr, kv_indptr, pages.reshape(-1).cuda(), kv_lens, heads, RANK, ROPE,
                     page_size, q_len > 1, (RANK + ROPE) ** -0.5, DTYPE, DTYPE)
        q_nope, q_pe = q[..., :RANK], q[..., RANK:]
        out = torch.empty(q.shape[0], heads, RANK, dtype=DTYPE, device="cuda")
        return lambda: wrapper.run(q_nope, q_pe, rows[..., :RANK], rows[..., RANK:], out=out)


def run() -> tuple[str, list[dict], list[str]]:
    attn_backend.set_debug_checks(False)
    peers = Peers()
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(b, kv, h, 1) for kv in KV_LENS for b in BATCHES for h in HEADS]
    shapes += [(b, kv, h, VERIFY_TOKENS) for b, kv in VERIFY_SHAPES for h in HEADS]
    for batch, kv_len, heads, q_len in shapes:
        rows += _shape_rows(peers, batch, kv_len, heads, q_len, gen)
        torch.cuda.empty_cache()
    if FP8_DTYPE in bench_kv_dtypes():
        bf16_us = {row["case"]: row["ours_us"] for row in rows}
        for batch, kv_len, heads, q_len in FP8_SHAPES:
            for row in _shape_rows(peers, batch, kv_len, heads, q_len, gen, FP8_DTYPE):
                same_shape = row["case"].replace(f"_{KV_DTYPE_NAMES[FP8_DTYPE]}_", "_bf16_")
                if same_shape in bf16_us:
                    row["vs_bf16_time"] = round(row["ours_us"] / bf16_us[same_shape], 3)
                rows.append(row)
            torch.cuda.empty_cache()
    return "TB/s", rows, peers.notes + [TIMING_NOTE]


def _other_kernels(shape: dict, planned) -> dict:
    """Our other MLA kernels on the same case, timed in the same run, so that one run says
    where each wins: the mma.sync ones where "auto" took a warpgroup kernel; the seesaw one
    where it took another and the cache is 16-bit, the 32-key warpgroup one where it took
    the seesaw one."""
    others = {"ours_mma": PagedPrefill(**shape, backend="mma")} if planned.wgmma else {}
    if planned.name == "prefill_mla_seesaw":
        others["ours_wgmma32"] = PagedPrefill(**shape, backend="wgmma")
    elif shape["kv_dtype"].itemsize == 2:
        try:
            others["ours_seesaw"] = PagedPrefill(**shape, backend="seesaw")
        except ValueError:  # an older build (a before/after run), or no sm_90 GPU
            pass
    return others


def _shape_rows(peers, batch, kv_len, heads, q_len, gen, kv_dtype=DTYPE) -> list[dict]:
    latent = torch.randn(batch * kv_len + 64 * 64, 1, RANK + ROPE, dtype=DTYPE, device="cuda")
    latent = latent.to(kv_dtype)
    scale = FP8_SCALE if kv_dtype.itemsize == 1 else None
    q = torch.randn(batch * q_len, heads, RANK + ROPE, dtype=DTYPE, device="cuda")
    moved = latent_bytes(batch, kv_len, kv_dtype) + q.numel() * 2 + \
        batch * q_len * heads * RANK * 2
    work = flops(batch, kv_len, heads, q_len)
    iters = 20 if moved > (4 << 30) else 50
    shape = dict(num_qo_heads=heads, num_kv_heads=1, head_dim=RANK + ROPE, head_dim_vo=RANK,
                 dtype=DTYPE, kv_dtype=kv_dtype, device="cuda", max_batch_size=batch,
                 max_num_tokens=batch * q_len)
    mla = PagedPrefill(**shape)
    others = None  # our other kernels on the same case (_other_kernels)
    qo_indptr = [q_len * r for r in range(batch + 1)]
    rows = []
    for page_size in PAGE_SIZES:
        # (no scale keyword for 16-bit caches: a before/after run's older build takes none)
        cache = PagedKVCache.from_mla(latent, RANK, page_size,
                                      **({"scale": scale} if scale is not None else {}))
        pages = shuffled_pages(batch, kv_len, page_size, cache.num_pages, gen)
        table = PageTable.from_block_table(pages.cuda())
        mla.plan(qo_indptr, [kv_len] * batch)
        out = torch.empty(q.shape[0], heads, RANK, dtype=DTYPE, device="cuda")
        timings = {"ours": median_ms(lambda: mla.run(q, cache, table, out=out), iters=iters)}
        if others is None:
            others = _other_kernels(shape, mla._planned.config)
        for name, other in others.items():
            other.plan(qo_indptr, [kv_len] * batch)
            timings[name] = median_ms(lambda: other.run(q, cache, table, out=out), iters=iters)
        if peers.flash_mla is not None and page_size == 64:
            try:
                timings["flashmla"] = median_ms(peers.flashmla(latent, pages, kv_len, q, q_len),
                                                iters=iters)
            except Exception as error:  # noqa: BLE001
                peers.note_once(f"flashmla failed: {type(error).__name__}: {error}"[:300])
        if peers.flashinfer is not None and scale is None:
            try:
                timings["flashinfer_mla"] = median_ms(
                    peers.flashinfer_mla(latent, pages, page_size, kv_len, q, q_len), iters=iters)
            except Exception as error:  # noqa: BLE001
                peers.note_once(f"flashinfer_mla failed: {type(error).__name__}: {error}"[:300])
        tbs = {name: moved / (ms * 1e-3) / 1e12 for name, ms in timings.items()}
        ours_others = {name: round(tbs.pop(name), 4) for name in others}
        rows.append({
            "case": case_name(batch, kv_len, heads, page_size, q_len, kv_dtype),
            "ours": round(tbs.pop("ours"), 4),
            "kernel": mla._planned.config.name,
            **ours_others,
            "peers": {name: round(value, 4) for name, value in sorted(tbs.items())},
            "ours_us": round(timings["ours"] * 1e3, 2),
            "tflops": {name: round(work / (ms * 1e-3) / 1e12, 2) for name, ms in timings.items()},
        })
    return rows


def plot(rows, ceiling_tbs, path, device: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(HEADS), len(BATCHES), figsize=(5 * len(BATCHES), 8.4),
                             sharey=True, squeeze=False)
    colors = {"ours": "tab:red", "flashmla": "tab:green", "flashinfer_mla": "tab:blue"}
    for axes, heads in zip(grid, HEADS):
        for ax, batch in zip(axes, BATCHES):
            for page_size, marker in ((64, "o"), (1, "x")):
                series: dict[str, list] = {}
                for row in rows:
                    if row["case"].startswith(f"b{batch}_kv") and f"_h{heads}_" in row["case"] \
                            and row["case"].endswith(f"_bf16_p{page_size}"):
                        kv_len = int(row["case"].split("_kv")[1].split("_")[0])
                        values = {"ours": row["ours"], **row["peers"]}
                        for name, value in values.items():
                            series.setdefault(name, []).append((kv_len, value))
                for name, points in series.items():
                    points.sort()
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
                            color=colors.get(name, "gray"), label=f"{name} p{page_size}")
            ax.axhline(ceiling_tbs, color="black", linewidth=1, label="copy ceiling")
            ax.set_xscale("log", base=2)
            ax.set_title(f"batch {batch}, {heads} heads")
            ax.set_xlabel("kv_len")
    grid[0][0].set_ylabel("TB/s (latent bytes / time)")
    grid[-1][0].set_ylabel("TB/s (latent bytes / time)")
    grid[0][-1].legend(fontsize=7)
    device = device or torch.cuda.get_device_name()
    fig.suptitle(f"MLA decode, latent 512 + rope 64, bf16 caches ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

