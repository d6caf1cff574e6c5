"""Random problems through the kernels, against the float reference (issue 22).

    python -m bench.fuzz [--cases 10000] [--workers 8] [--first-seed 0] [--out DIR]
    python -m bench.fuzz --seed 1234          (one case, printed: how a failure is reproduced)

Each case is drawn from its seed alone (`draw_case`): decode or prefill; batch 1..1024 (most
small), KV lengths 0..128k, query lengths 0..2k, page sizes 1..128 including non-powers of two,
shuffled pages and pages shared between requests (a common prefix), vLLM block tables or
SGLang token-slot tables (pool rows shuffled, slot maps), garbage in the table entries past
each request's length, GQA groups 1..128, head dims 64/128/256, fp16/bf16, causal or not,
windows, soft-caps, tree masks, padding requests (no keys, or no queries), FP8 caches (e4m3fn
and e5m2, scales per tensor or per kv head), MLA (15% of seeds: all heads, up to 128, over
one 576-wide latent row per token on PagedPrefill, 16-bit or FP8 with one scale; drawn last,
so the other seeds' cases are those of earlier campaigns), scaled queries (peaked softmax),
each wrapper backend, eager or a CUDA-graph replay of a capture made with other lengths.
Outputs are NaN-poisoned before each run; output and LSE are compared with
`attn_backend.reference` (float32, chunked over query rows, on the GPU). Workers are separate
processes over disjoint seeds (the host work of drawing, planning and the reference is the cost;
the GPU is mostly idle). The JSON result (`fuzz-<date>-<gpu>.json`) holds `cases`,
`mismatches`, `errors` and the seeds of any, and how often each feature was drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import random
import sys
import time
import traceback
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

from attn_backend.reference import KERNEL_TOLERANCE

# LSE is float32 in both (the output's tolerance: reference.KERNEL_TOLERANCE).
LSE_ATOL, LSE_RTOL = 2e-3, 1e-3
MAX_KV_ELEMENTS = 1 << 26  # tokens x kv heads x head dim of one cache side
MAX_Q_TOKENS = 8192
MAX_REFERENCE_MACS = 1 << 31  # query rows x keys x head dim, summed over requests
MAX_BATCH = 1024
PAGE_SIZES = (1, 2, 3, 5, 8, 16, 16, 16, 32, 48, 64, 64, 100, 128)
GROUPS = (1, 1, 2, 3, 4, 4, 5, 8, 8, 16, 32, 64, 128)
MAX_QO_HEADS = 256


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    kind: str  # "decode" | "prefill"
    kv_lens: tuple[int, ...]
    q_lens: tuple[int, ...]  # decode: 1 per request
    page_size: int
    num_kv_heads: int
    group: int
    head_dim: int
    dtype: str
    engine: str  # "vllm" (block table) | "sglang" (token slots)
    layout: str  # "sglang" | "vllm_nhd" | "vllm_hnd"
    slot_map: bool
    shared_prefix: bool
    causal: bool
    window_left: int
    soft_cap: float
    tree_mask: bool
    graph: bool
    backend: str
    q_scale: float
    debug_checks: bool
    kv_dtype: str = "same"  # "same" (the query's) | "float8_e4m3fn" | "float8_e5m2"
    per_head_scales: bool = False  # FP8: one K and one V scale per kv head, else one each
    # MLA (absorbed): one latent row of 576 per token (V its first 512), all heads over it,
    # on PagedPrefill (a decode is a prefill of one token per request); layout "mla".
    mla: bool = False

    @property
    def batch(self) -> int:
        return len(self.kv_lens)

    def describe(self) -> str:
        lens = (f"kv {min(self.kv_lens)}..{max(self.kv_lens)} (sum {sum(self.kv_lens)}), "
                f"q {min(self.q_lens)}..{max(self.q_lens)} (sum {sum(self.q_lens)})")
        flags = [f for f, on in (("slot_map", self.slot_map), ("shared", self.shared_prefix),
                                 ("causal", self.causal and self.kind == "prefill"),
                                 ("tree", self.tree_mask), ("graph", self.graph),
                                 ("debug", self.debug_checks)) if on]
        if self.window_left >= 0:
            flags.append(f"window{self.window_left}")
        if self.soft_cap:
            flags.append(f"softcap{self.soft_cap:.1f}")
        if self.kv_dtype != "same":
            flags.append(f"kv_{self.kv_dtype}" + ("_per_head" if self.per_head_scales else ""))
        if self.mla:
            flags.append("mla")
        return (f"seed {self.seed}: {self.kind} b{self.batch} {lens} p{self.page_size} "
                f"h{self.num_kv_heads * self.group}-{self.num_kv_heads} d{self.head_dim} "
                f"{self.dtype} {self.engine}/{self.layout} backend={self.backend} "
                f"qx{self.q_scale:g} {' '.join(flags)}")


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def draw_case(seed: int) -> Case:
    """The case of `seed` (the same on every machine: Python's Random only)."""
    rng = random.Random(seed)
    kind = rng.choice(("decode", "prefill"))
    head_dim = rng.choice((64, 128, 128, 128, 256))
    num_kv_heads = rng.choice((1, 2, 4, 8))
    group = rng.choice(GROUPS)
    while num_kv_heads * group > MAX_QO_HEADS:
        num_kv_heads //= 2
    page_size = rng.choice(PAGE_SIZES)
    draw = rng.random()
    batch = rng.randint(1, 16) if draw < 0.6 else rng.randint(17, 128) if draw < 0.9 \
        else rng.randint(129, MAX_BATCH)
    max_kv = rng.choice((16, 300, 2048, 16384, 131072))
    kv_lens = [0 if rng.random() < 0.05 else _log_uniform(rng, 1, max_kv) for _ in range(batch)]
    budget = MAX_KV_ELEMENTS // (num_kv_heads * head_dim)
    if sum(kv_lens) > budget:  # scale the batch's lengths into the cache budget
        scale = budget / sum(kv_lens)
        kv_lens = [int(n * scale) for n in kv_lens]
    window_left = rng.choice((0, 1, 7, 64, 500, 4000)) if rng.random() < 0.25 else -1
    soft_cap = round(rng.uniform(5.0, 50.0), 2) if rng.random() < 0.2 else 0.0
    causal, tree_mask = True, False
    if kind == "decode":
        q_lens = [1] * batch
        backends = ["auto", "auto", "auto", "split"] + (["full_batch"] if head_dim == 128 else [])
    else:
        causal = rng.random() < 0.8
        tree_mask = rng.random() < 0.2
        max_q = rng.choice((1, 4, 8, 64, 512, 2048))
        last_keys = causal or tree_mask or window_left >= 0  # as ordered(case)
        q_lens = []
        for n in kv_lens:
            cap = min(max_q, n) if last_keys else max_q
            q_lens.append(0 if cap < 1 or rng.random() < 0.05 else _log_uniform(rng, 1, cap))
        if sum(q_lens) > MAX_Q_TOKENS:
            scale = MAX_Q_TOKENS / sum(q_lens)
            q_lens = [int(n * scale) for n in q_lens]
        backends = ["auto", "auto", "auto", "mma"]
    macs = sum(q * k for q, k in zip(q_lens, kv_lens)) * num_kv_heads * group * head_dim
    if macs > MAX_REFERENCE_MACS:  # keep the float32 reference within a second or so
        scale = math.sqrt(MAX_REFERENCE_MACS / macs)
        kv_lens = [int(n * scale) for n in kv_lens]
        q_lens = [min(int(q * scale), k) if kind == "prefill" else 1
                  for q, k in zip(q_lens, kv_lens)]
    if tree_mask and sum(q * k for q, k in zip(q_lens, kv_lens)) > (1 << 26):
        tree_mask = False  # the mask is built on the host: keep it small
    engine = rng.choice(("vllm", "sglang"))
    layout = "sglang" if engine == "sglang" else rng.choice(("vllm_nhd", "vllm_hnd"))
    case = Case(
        seed=seed, kind=kind, kv_lens=tuple(kv_lens), q_lens=tuple(q_lens), page_size=page_size,
        num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
        dtype=rng.choice(("bfloat16", "float16")), engine=engine, layout=layout,
        slot_map=engine == "sglang" and rng.random() < 0.25,
        shared_prefix=rng.random() < 0.2, causal=causal, window_left=window_left,
        soft_cap=soft_cap, tree_mask=tree_mask, graph=rng.random() < 0.25,
        backend=rng.choice(backends), q_scale=rng.choice((1.0, 1.0, 2.0, 4.0)),
        debug_checks=rng.random() < 0.1,
        # Drawn last, so the draws of every other field stay as they were for each seed.
        kv_dtype=rng.choice(("same", "same", "float8_e4m3fn", "float8_e5m2")),
        per_head_scales=rng.random() < 0.5)
    if rng.random() < MLA_SHARE:
        case = as_mla_case(case)
    return case


MLA_SHARE = 0.15
MLA_HEAD_DIMS = (576, 512)


def as_mla_case(case: Case) -> Case:
    """The case's batch as MLA: its heads (up to 128) over one latent row per token (its cache
    dtype kept: 16-bit or FP8 with one scale for the row), on PagedPrefill (decode requests
    become one-token prefills, none for a request without keys), lengths rescaled into the
    cache and reference budgets of 576-wide rows."""
    heads = min(case.num_kv_heads * case.group, 128)
    kv_lens = list(case.kv_lens)
    budget = MAX_KV_ELEMENTS // MLA_HEAD_DIMS[0]
    if sum(kv_lens) > budget:
        kv_lens = [int(n * budget / sum(kv_lens)) for n in kv_lens]
    if case.kind == "decode":
        q_lens = [1 if n else 0 for n in kv_lens]
    else:
        q_lens = [min(q, k) if ordered(case) else q for q, k in zip(case.q_lens, kv_lens)]
    macs = sum(q * k for q, k in zip(q_lens, kv_lens)) * heads * sum(MLA_HEAD_DIMS)
    if macs > MAX_REFERENCE_MACS:
        scale = math.sqrt(MAX_REFERENCE_MACS / macs)
        kv_lens = [int(n * scale) for n in kv_lens]
        q_lens = [min(int(q * scale) if case.kind == "prefill" else q, k) if ordered(case)
                  else int(q * scale) for q, k in zip(q_lens, kv_lens)]
    return dataclasses.replace(
        case, kind="prefill", kv_lens=tuple(kv_lens), q_lens=tuple(q_lens), num_kv_heads=1,
        group=heads, head_dim=MLA_HEAD_DIMS[0], layout="mla", slot_map=False,
        backend="mma" if case.backend == "mma" else "auto",
        per_head_scales=False, tree_mask=case.tree_mask and case.kind == "prefill", mla=True)


# ---- the problem of a case: cache, page table, the slots the reference reads ----

@dataclasses.dataclass
class Problem:
    cache: object  # PagedKVCache
    table: object  # PageTable
    kv_indptr: torch.Tensor
    kv_slots: torch.Tensor  # the cache slots of every request's keys, in order
    q: torch.Tensor
    mask: torch.Tensor | None


def request_pages(case: Case, rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Each request's page ids in order (shuffled over the cache; with `shared_prefix` the
    requests after the first start on the first request's full pages), and the page count."""
    ps = case.page_size
    needed = [-(-n // ps) for n in case.kv_lens]
    shared = []
    full_pages_of_first = case.kv_lens[0] // ps
    for r, count in enumerate(needed):
        share = 0
        if case.shared_prefix and r > 0 and full_pages_of_first:
            share = min(count, int(rng.integers(0, full_pages_of_first + 1)))
        shared.append(share)
    own = [c - s for c, s in zip(needed, shared)]
    num_pages = sum(own) + 1 + int(rng.integers(0, 4))
    order = rng.permutation(num_pages)
    pages, start = [], 0
    for r, count in enumerate(own):
        mine = order[start:start + count]
        start += count
        pages.append(np.concatenate([pages[0][:shared[r]], mine]) if shared[r] else mine)
    return pages, num_pages


def build_problem(case: Case, device) -> Problem:
    from attn_backend import PagedKVCache, PageTable

    rng = np.random.default_rng(case.seed)
    gen = torch.Generator(device=device).manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    kv_dtype = dtype if case.kv_dtype == "same" else getattr(torch, case.kv_dtype)
    ps, h, d = case.page_size, case.num_kv_heads, case.head_dim
    pages, num_pages = request_pages(case, rng)

    def rand(*shape, as_type=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(as_type)

    scales = {}
    if case.kv_dtype != "same":  # stored values as drawn (randn, cast), read times the scales
        count = h if case.per_head_scales else 1
        scales = {name: torch.from_numpy(rng.uniform(0.05, 3.0, count).astype(np.float32))
                  .to(device).reshape(-1 if case.per_head_scales else ())
                  for name in ("k_scale", "v_scale")}
    if case.mla:  # SGLang's [slots, 1, 576] pool row, or vLLM's [blocks, block, 576]: one memory
        cache = PagedKVCache.from_mla(rand(num_pages * ps, 1, MLA_HEAD_DIMS[0], as_type=kv_dtype),
                                      MLA_HEAD_DIMS[1], ps, scale=scales.get("k_scale"))
    elif case.layout == "sglang":
        cache = PagedKVCache.from_sglang(rand(num_pages * ps, h, d, as_type=kv_dtype),
                                         rand(num_pages * ps, h, d, as_type=kv_dtype), ps,
                                         **scales)
    elif case.layout == "vllm_nhd":
        cache = PagedKVCache.from_vllm(
            rand(num_pages, ps, h, 2 * d, as_type=kv_dtype).transpose(1, 2), d, **scales)
    else:
        cache = PagedKVCache.from_vllm(rand(num_pages, h, ps, 2 * d, as_type=kv_dtype), d,
                                       **scales)
    slots = [(p[np.arange(n) // ps] * ps + np.arange(n) % ps) if n else np.zeros(0, np.int64)
             for p, n in zip(pages, case.kv_lens)]
    batch = case.batch
    garbage = int(rng.choice([-7, 1 << 30, num_pages * ps + 5]))  # never read: past the lengths
    if case.engine == "vllm":
        columns = max(1, max(len(p) for p in pages)) + int(rng.integers(0, 3))
        table = np.full((batch, columns), garbage if garbage >= 0 else -1, dtype=np.int64)
        for r, p in enumerate(pages):
            table[r, :len(p)] = p
        page_table = PageTable.from_block_table(torch.from_numpy(table.astype(np.int32)).to(device))
    else:
        columns = max(1, max(case.kv_lens)) + int(rng.integers(0, 2 * ps + 1))
        pool_rows = batch + int(rng.integers(1, 4))
        rows = rng.permutation(pool_rows)[:batch]
        table = np.full((pool_rows, columns), garbage, dtype=np.int64)
        for r in range(batch):
            table[rows[r], :case.kv_lens[r]] = slots[r]
        slot_map = None
        if case.slot_map:  # the table holds stand-ins s'; slot_map[s'] is the real slot
            size = num_pages * ps
            stand_in = rng.permutation(2 * size)[:size]
            mapping = np.full(2 * size, -1, dtype=np.int64)
            mapping[stand_in] = np.arange(size)
            used = table >= 0
            used &= table < size
            table = np.where(used, stand_in[np.clip(table, 0, size - 1)], table)
            slot_map = torch.from_numpy(mapping).to(device)
        row_index = torch.from_numpy(rows.astype(np.int64 if rng.random() < 0.5 else np.int32))
        page_table = PageTable.from_req_to_token(
            torch.from_numpy(table.astype(np.int32)).to(device), row_index.to(device),
            slot_map=slot_map)
    kv_indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(case.kv_lens)]))
    kv_slots = torch.from_numpy(np.concatenate(slots) if slots else np.zeros(0, np.int64))
    num_q = sum(case.q_lens)
    q = (rand(num_q, h * case.group, d).float() * case.q_scale).to(dtype)
    mask = tree_masks(case, rng).to(device) if case.tree_mask else None
    return Problem(cache, page_table, kv_indptr.to(device), kv_slots.to(device), q, mask)


def tree_masks(case: Case, rng: np.random.Generator) -> torch.Tensor:
    """A verify mask per request (the prefix visible, each draft its ancestors), flattened."""
    blocks = []
    for n, length in zip(case.q_lens, case.kv_lens):
        mask = np.zeros((n, length), dtype=bool)
        prefix = length - n
        mask[:, :prefix] = True
        for i in range(n):
            mask[i, prefix + i] = True
            if i:
                parent = int(rng.integers(0, i))
                mask[i, prefix:] |= mask[parent, prefix:]
        blocks.append(mask.reshape(-1))
    return torch.from_numpy(np.concatenate(blocks) if blocks else np.zeros(0, bool))


# ---- running a case ----

_WRAPPERS: OrderedDict = OrderedDict()
_KEPT_WRAPPERS = 12  # each holds plan buffers sized for the fuzzer's largest batch


def wrapper_for(case: Case, device, graph: bool):
    """A wrapper of the case's configuration, built at the fuzzer's limits and reused across
    cases (the last few configurations are kept); a graph-mode case gets its own, sized for
    its batch (a capture keeps its buffers)."""
    from attn_backend import PagedDecode, PagedPrefill

    key = (case.kind, case.num_kv_heads, case.group, case.head_dim, case.dtype, case.kv_dtype,
           case.backend)

    if key in _WRAPPERS and not graph:
        _WRAPPERS.move_to_end(key)
        return _WRAPPERS[key]
    common = dict(num_qo_heads=case.num_kv_heads * case.group, num_kv_heads=case.num_kv_heads,
                  head_dim=case.head_dim, head_dim_vo=MLA_HEAD_DIMS[1] if case.mla else None,
                  dtype=getattr(torch, case.dtype), device=device,
                  backend=case.backend, use_cuda_graph=graph,
                  kv_dtype=None if case.kv_dtype == "same" else getattr(torch, case.kv_dtype))
    batch = case.batch if graph else MAX_BATCH
    if case.kind == "decode":
        wrapper = PagedDecode(max_batch_size=batch, **common)
    else:
        mask_elements = sum(q * k for q, k in zip(case.q_lens, case.kv_lens))
        wrapper = PagedPrefill(
            max_batch_size=batch,
            max_num_tokens=max(1, sum(case.q_lens)) if graph else MAX_Q_TOKENS,
            max_mask_elements=mask_elements if graph else 0, **common)
    if not graph:
        _WRAPPERS[key] = wrapper
        while len(_WRAPPERS) > _KEPT_WRAPPERS:
            _WRAPPERS.popitem(last=False)
    return wrapper


def warm_up_lengths(case: Case) -> tuple[list[int], list[int]]:
    """Other lengths of the same batch for a graph's capture (the replay then runs the case's):
    the KV lengths reversed (no longer than the longest, so the table's columns suffice; a row
    read past its own pages finds only the garbage ids, which are skipped), kept at least as
    long as each request's queries where the queries must be the last keys."""
    kv = list(reversed(case.kv_lens))
    if case.kind == "prefill" and ordered(case):
        kv = [max(k, q) for k, q in zip(kv, case.q_lens)]
    return kv, list(case.q_lens)


def ordered(case: Case) -> bool:
    """Whether the queries must be the last keys of their requests (causal, mask, window)."""
    return case.causal or case.tree_mask or case.window_left >= 0


def plan(wrapper, case: Case, kv_lens, mask) -> None:
    if case.kind == "decode":
        wrapper.plan(kv_lens, window_left=case.window_left)
    else:
        qo_indptr = np.concatenate([[0], np.cumsum(case.q_lens)])
        wrapper.plan(qo_indptr, kv_lens, causal=case.causal, window_left=case.window_left,
                     custom_mask=mask)


def run_kernels(case: Case, problem: Problem, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and LSE of the case's wrapper, eager or replayed from a capture made with the
    warm-up lengths; the output is poisoned with NaN first. Debug checks as the case says
    (the caller's setting is restored after)."""
    from attn_backend._validation import debug_checks_enabled, set_debug_checks

    graph = case.graph and torch.device(device).type == "cuda"
    before = debug_checks_enabled()
    # Not with a graph: its capture-time lengths read the garbage past some rows on purpose.
    set_debug_checks(case.debug_checks and not graph)
    try:
        return _run_kernels(case, problem, device, graph)
    finally:
        set_debug_checks(before)


def _run_kernels(case: Case, problem: Problem, device, graph: bool):
    wrapper = wrapper_for(case, device, graph)
    head_dim_vo = problem.cache.head_dim_v
    out = torch.full((problem.q.shape[0], problem.q.shape[1], head_dim_vo), float("nan"),
                     dtype=problem.q.dtype, device=device)

    def call():
        return wrapper.run(problem.q, problem.cache, problem.table, out=out, return_lse=True,
                           logits_soft_cap=case.soft_cap)[1]

    if not graph:
        plan(wrapper, case, list(case.kv_lens), problem.mask)
        lse = call()
    else:
        warm_kv, _ = warm_up_lengths(case)
        warm_mask = None
        if problem.mask is not None:  # the same lengths, another tree
            warm_mask = tree_masks(dataclasses.replace(case, kv_lens=tuple(warm_kv)),
                                   np.random.default_rng(case.seed + 1)).to(device)
            if warm_mask.numel() > problem.mask.numel():
                warm_kv, warm_mask = list(case.kv_lens), problem.mask
        plan(wrapper, case, warm_kv, warm_mask)
        call()  # outside the capture first (lazy initialisation)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            lse = call()
        plan(wrapper, case, list(case.kv_lens), problem.mask)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        captured.replay()
    if graph:
        torch.cuda.synchronize()
    return out, lse


def reference_result(case: Case, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    from attn_backend import reference

    q = problem.q
    if case.kind == "decode":  # a request without keys has no query: out 0, lse -inf
        keyed = [i for i, n in enumerate(case.kv_lens) if n > 0]
        out = torch.zeros(q.shape[0], q.shape[1], problem.cache.head_dim_v, device=q.device)
        lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), device=q.device)
        if keyed:
            lens = [case.kv_lens[i] for i in keyed]
            slots = torch.cat([problem.kv_slots[problem.kv_indptr[i]:problem.kv_indptr[i + 1]]
                               for i in keyed])
            want = reference.attention(
                q[keyed], list(range(len(keyed) + 1)), problem.cache,
                np.concatenate([[0], np.cumsum(lens)]).tolist(), slots, causal=True,
                window_left=case.window_left, logits_soft_cap=case.soft_cap)
            out[keyed], lse[keyed] = want.out, want.lse
        return out, lse
    qo_indptr = np.concatenate([[0], np.cumsum(case.q_lens)]).tolist()
    want = reference.attention(q, qo_indptr, problem.cache, problem.kv_indptr.tolist(),
                               problem.kv_slots, causal=case.causal,
                               window_left=case.window_left, logits_soft_cap=case.soft_cap,
                               custom_mask=problem.mask)
    return want.out, want.lse


def compare(case: Case, got_out, got_lse, want_out, want_lse) -> str | None:
    """None when they agree, else what differs."""
    tol = KERNEL_TOLERANCE[getattr(torch, case.dtype)]
    error = (got_out.float() - want_out).abs()
    bad_out = ~(error <= tol + tol * want_out.abs())  # NaN (an unwritten element) is bad
    both_inf = torch.isinf(got_lse) & torch.isinf(want_lse) & (got_lse.sign() == want_lse.sign())
    lse_error = (got_lse - want_lse).abs()
    bad_lse = ~(both_inf | (lse_error <= LSE_ATOL + LSE_RTOL * want_lse.abs()))
    if not bad_out.any() and not bad_lse.any():
        return None
    parts = []
    if bad_out.any():
        rows = bad_out.any(dim=2).any(dim=1).nonzero().flatten()
        parts.append(f"out: {int(bad_out.sum())} elements in {rows.numel()} rows (first "
                     f"{rows[:4].tolist()}), max error {error.nan_to_num(float('inf')).max():.3g}")
    if bad_lse.any():
        rows = bad_lse.any(dim=1).nonzero().flatten()
        parts.append(f"lse: {int(bad_lse.sum())} values in rows {rows[:4].tolist()}")
    return "; ".join(parts)


def run_case(seed: int, device="cuda") -> dict:
    """{seed, case, status: ok | mismatch | error, detail}."""
    case = draw_case(seed)
    result = {"seed": seed, "case": case.describe(), "status": "ok", "detail": ""}
    try:
        problem = build_problem(case, device)
        got_out, got_lse = run_kernels(case, problem, device)
        want_out, want_lse = reference_result(case, problem)
        difference = compare(case, got_out, got_lse, want_out, want_lse)
        if difference:
            result.update(status="mismatch", detail=difference)
    except Exception as error:  # a valid case must run: any exception is a finding
        result.update(status="error", detail="".join(
            traceback.format_exception_only(type(error), error)).strip()[-600:])
    return result


def features(case: Case) -> list[str]:
    names = [case.kind, case.dtype, f"engine_{case.engine}", f"layout_{case.layout}",
             f"kv_{case.kv_dtype}" + ("_per_head" if case.per_head_scales and
                                      case.kv_dtype != "same" else ""),
             f"p{case.page_size}",
             f"d{case.head_dim}", f"group{case.group}", f"backend_{case.backend}"]
    names += [f for f, on in (("graph", case.graph), ("slot_map", case.slot_map),
                              ("shared_prefix", case.shared_prefix),
                              ("tree_mask", case.tree_mask), ("soft_cap", case.soft_cap > 0),
                              ("window", case.window_left >= 0),
                              ("non_causal", case.kind == "prefill" and not case.causal),
                              ("padding_request", 0 in case.kv_lens or 0 in case.q_lens),
                              ("kv_over_32k", max(case.kv_lens) > 32768),
                              ("batch_over_128", case.batch > 128), ("mla", case.mla),
                              ("mla_fp8", case.mla and case.kv_dtype != "same")) if on]
    return names


# ---- workers and the result file ----

def _worker(seeds: list[int], queue) -> None:
    torch.manual_seed(0)
    from attn_backend import _extension

    _extension.load_ops()
    for seed in seeds:
        queue.put(run_case(seed))
    queue.put(None)


def run_many(first_seed: int, cases: int, workers: int, seconds: float | None) -> list[dict]:
    seeds = list(range(first_seed, first_seed + cases))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(seeds[w::workers], queue), daemon=True)
                 for w in range(workers)]
    for process in processes:
        process.start()
    results, done, start = [], 0, time.time()
    while done < workers:
        item = queue.get()
        if item is None:
            done += 1
            continue
        results.append(item)
        if item["status"] != "ok":
            print(f"{item['status'].upper()} {item['case']}: {item['detail']}", flush=True)
        if len(results) % 1000 == 0:
            print(f"  {len(results)} cases in {time.time() - start:.0f} s", flush=True)
        if seconds is not None and time.time() - start > seconds:
            break
    for process in processes:
        process.terminate() if process.is_alive() else process.join()
    return sorted(results, key=lambda r: r["seed"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="run this one case, verbosely")
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    args = parser.parse_args()
    if args.seed is not None:
        print(draw_case(args.seed).describe())
        result = run_case(args.seed)
        print(result["status"], result["detail"])
        sys.exit(0 if result["status"] == "ok" else 1)

    from .common import git_commit

    start = time.time()
    results = run_many(args.first_seed, args.cases, args.workers, args.seconds)
    elapsed = time.time() - start
    mismatches = [r for r in results if r["status"] == "mismatch"]
    errors = [r for r in results if r["status"] == "error"]
    coverage = Counter(f for r in results for f in features(draw_case(r["seed"])))
    print(f"fuzz: {len(results)} cases in {elapsed:.0f} s ({args.workers} workers): "
          f"{len(mismatches)} mismatches, {len(errors)} errors")
    if args.out:
        name = torch.cuda.get_device_name().split()[-1].lower()
        date = time.strftime("%Y-%m-%d")
        record = {
            "benchmark": "fuzz", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "date": date, "git_commit": git_commit(),
            "command": os.environ.get("ATTN_BACKEND_BENCH_COMMAND",
                                      "python -m bench.fuzz " + " ".join(sys.argv[1:])),
            "cases": len(results), "mismatches": len(mismatches), "errors": len(errors),
            "first_seed": args.first_seed, "seconds": round(elapsed, 1),
            "mismatch_cases": [{k: r[k] for k in ("seed", "case", "detail")} for r in mismatches],
            "error_cases": [{k: r[k] for k in ("seed", "case", "detail")} for r in errors],
            "coverage": dict(sorted(coverage.items())),
            "notes": ["Reproduce a case: python -m bench.fuzz --seed SEED",
                      f"tolerance: output {({str(k): v for k, v in KERNEL_TOLERANCE.items()})} "
                      f"(reference.KERNEL_TOLERANCE, abs + rel), lse atol {LSE_ATOL} "
                      f"rtol {LSE_RTOL}; reference: attn_backend.reference in float32"],
        }
        path = Path(args.out) / f"fuzz-{date}-{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")
    sys.exit(1 if mismatches or errors else 0)


if __name__ == "__main__":
    main()
