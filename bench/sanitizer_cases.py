"""A small but complete set of kernel calls for compute-sanitizer (scripts/gpu_sanitize.sh).

    compute-sanitizer --tool memcheck python -m bench.sanitizer_cases

Every kernel configuration and variant once, on problems small enough for racecheck: decode
(split shape with its in-launch split-KV merge, full-batch shape, d64/128/256, fp16/bf16, a
group of 32 heads in row tiles, window, soft-cap, SGLang tables with slot maps and shared pages,
page sizes 1/7/16, a CUDA-graph replay), prefill (the short-query, mma and wgmma kernels, causal
and not, window, soft-cap, tree masks, split-KV, a graph replay), both on FP8 caches (e4m3 and
e5m2, per-tensor and per-head scales), the KV write kernel in both layouts (16-bit, and the
quantising write into FP8 caches), the MLA latent kernel and MLA models' (192, 128) prefill
shapes; then bad input with debug checks off (page ids past the
cache and negative, slots past the slot map, table rows past the table, write slots past the
cache), each followed by a normal call checked against the reference, which shows the context
is alive. Each attention call is compared with the float reference (bench/fuzz.py's harness);
the exit status is 1 on a mismatch.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from .fuzz import MLA_HEAD_DIMS, Case, build_problem, compare, reference_result, run_kernels

BASE = Case(seed=1, kind="decode", kv_lens=(700, 33, 1, 0), q_lens=(1, 1, 1, 1), page_size=16,
            num_kv_heads=2, group=4, head_dim=128, dtype="bfloat16", engine="vllm",
            layout="vllm_nhd", slot_map=False, shared_prefix=False, causal=True, window_left=-1,
            soft_cap=0.0, tree_mask=False, graph=False, backend="auto", q_scale=1.0,
            debug_checks=False)
PREFILL = dataclasses.replace(BASE, kind="prefill", kv_lens=(300, 900, 40, 1),
                              q_lens=(5, 100, 0, 1))
# The MLA latent kernel: all heads over one 576-wide row per token (bench/fuzz.py's MLA cases).
MLA = dataclasses.replace(PREFILL, num_kv_heads=1, group=16, head_dim=MLA_HEAD_DIMS[0],
                          layout="mla", mla=True)


def cases() -> list[tuple[str, Case]]:
    r = dataclasses.replace
    return [
        ("decode split-KV, in-launch merge", BASE),
        ("decode full-batch shape", r(BASE, backend="full_batch", seed=2)),
        ("decode d64 fp16", r(BASE, head_dim=64, dtype="float16", seed=3)),
        ("decode d256", r(BASE, head_dim=256, seed=4)),
        ("decode group 32, window, soft-cap", r(BASE, group=32, num_kv_heads=1, window_left=64,
                                                 soft_cap=30.0, seed=5)),
        ("decode sglang slot map, shared pages, page 7",
         r(BASE, engine="sglang", layout="sglang", slot_map=True, shared_prefix=True,
           page_size=7, seed=6)),
        ("decode page 1", r(BASE, page_size=1, layout="vllm_hnd", seed=7)),
        ("decode graph replay", r(BASE, graph=True, seed=8)),
        ("prefill short + long tiles, auto", PREFILL),
        ("prefill mma", r(PREFILL, backend="mma", seed=9)),
        ("prefill long query (wgmma on sm_90), split-KV",
         r(PREFILL, kv_lens=(2000,), q_lens=(300,), seed=10)),
        ("prefill non-causal, soft-cap", r(PREFILL, causal=False, soft_cap=20.0, seed=11)),
        ("prefill window", r(PREFILL, window_left=50, seed=12)),
        ("prefill tree masks", r(PREFILL, kv_lens=(200, 1000), q_lens=(4, 8), tree_mask=True,
                                 engine="sglang", layout="sglang", seed=13)),
        ("prefill d64 fp16, page 1", r(PREFILL, head_dim=64, dtype="float16", page_size=1,
                                       seed=14)),
        ("prefill d256", r(PREFILL, head_dim=256, seed=15)),
        ("prefill graph replay, tree masks", r(PREFILL, kv_lens=(200, 1000), q_lens=(4, 8),
                                               tree_mask=True, graph=True, seed=16)),
        ("decode fp8 e4m3, per-head scales, split-KV",
         r(BASE, kv_dtype="float8_e4m3fn", per_head_scales=True, seed=17)),
        ("decode fp8 e5m2 fp16, full-batch shape, graph replay",
         r(BASE, kv_dtype="float8_e5m2", dtype="float16", backend="full_batch", graph=True,
           seed=18)),
        ("decode fp8 e4m3 d256, soft-cap", r(BASE, kv_dtype="float8_e4m3fn", head_dim=256,
                                             soft_cap=30.0, seed=19)),
        ("prefill fp8 e4m3, short + long tiles, split-KV",
         r(PREFILL, kv_dtype="float8_e4m3fn", per_head_scales=True, kv_lens=(2000, 300, 40),
           q_lens=(300, 4, 1), seed=20)),
        ("prefill fp8 e5m2 d64, tree masks", r(PREFILL, kv_dtype="float8_e5m2", head_dim=64,
                                               kv_lens=(200, 1000), q_lens=(4, 8),
                                               tree_mask=True, seed=21)),
        ("mla decode, 16 heads, split-KV", r(MLA, kv_lens=(3000, 40, 1), q_lens=(1, 1, 1),
                                             seed=25)),
        ("mla verify, 64 heads (64-row wgmma tiles on sm_90, else 32-row), tree masks",
         r(MLA, group=64, kv_lens=(300, 70), q_lens=(4, 2), tree_mask=True, engine="sglang",
           seed=26)),
        ("mla decode, 128 heads (wgmma on sm_90), split-KV",
         r(MLA, group=128, kv_lens=(5000, 33), q_lens=(1, 1), seed=27)),
        ("mla decode, 128 heads, seesaw (sm_90), split-KV",
         r(MLA, group=128, kv_lens=(5000, 33), q_lens=(1, 1), backend="seesaw", seed=32)),
        ("mla verify, 64 heads, seesaw (sm_90), tree masks",
         r(MLA, group=64, kv_lens=(300, 70), q_lens=(4, 2), tree_mask=True, engine="sglang",
           backend="seesaw", seed=33)),
        ("mla decode, 16 heads, mma", r(MLA, kv_lens=(700, 64), q_lens=(1, 1), backend="mma",
                                        seed=28)),
        ("mla fp8 e4m3 decode, 16 heads, split-KV",
         r(MLA, kv_dtype="float8_e4m3fn", kv_lens=(3000, 40, 1), q_lens=(1, 1, 1), seed=29)),
        ("mla fp8 e5m2 decode, 128 heads (wgmma on sm_90), split-KV",
         r(MLA, kv_dtype="float8_e5m2", group=128, kv_lens=(5000, 33), q_lens=(1, 1),
           seed=30)),
        ("mla fp8 e4m3 verify, 64 heads, tree masks, graph replay",
         r(MLA, kv_dtype="float8_e4m3fn", group=64, kv_lens=(300, 70), q_lens=(4, 2),
           tree_mask=True, graph=True, seed=31)),
    ]


def check_case(name: str, case: Case) -> bool:
    problem = build_problem(case, "cuda")
    got_out, got_lse = run_kernels(case, problem, "cuda")
    want_out, want_lse = reference_result(case, problem)
    difference = compare(case, got_out, got_lse, want_out, want_lse)
    print(f"{'MISMATCH' if difference else 'ok'}: {name}" + (f": {difference}" if difference
                                                              else ""), flush=True)
    return difference is None


def run_bad_table(name: str, case: Case, corrupt) -> bool:
    """`corrupt(problem)` spoils the page table in place; the call must run (debug checks
    off) without touching memory outside the buffers, and a normal call after it must
    still be right."""
    problem = build_problem(case, "cuda")
    corrupt(problem)
    run_kernels(case, problem, "cuda")
    torch.cuda.synchronize()
    print(f"ran: {name}", flush=True)
    return check_case(f"normal call after {name}", dataclasses.replace(case, seed=case.seed + 100))


def bad_inputs() -> list[bool]:
    results = []
    vllm = dataclasses.replace(BASE, seed=21)

    def pages_outside(problem):
        table = problem.table.table
        table[0, 0] = problem.cache.num_pages + 3
        table[0, 1] = -2
        table[1, 0] = 1 << 30

    results.append(run_bad_table("page ids past the cache and negative", vllm, pages_outside))
    sglang = dataclasses.replace(BASE, engine="sglang", layout="sglang", slot_map=True, seed=22)

    def slots_outside(problem):
        table, rows = problem.table.table, problem.table.row_index
        table[rows[0], 0] = problem.table.slot_map.numel() + 11  # past the slot map
        table[rows[0], 1] = 1 << 30
        table[rows[1], 0] = -9

    results.append(run_bad_table("slots past the slot map and negative", sglang, slots_outside))
    plain = dataclasses.replace(sglang, slot_map=False, seed=23)

    def rows_outside(problem):
        rows = problem.table.row_index
        rows[0] = problem.table.table.shape[0] + 5  # a table row that does not exist
        rows[1] = -1

    results.append(run_bad_table("row indices past the table", plain, rows_outside))
    results.append(run_bad_table("prefill with page ids past the cache",
                                 dataclasses.replace(PREFILL, seed=24), pages_outside))
    return results


def kv_writes() -> list[bool]:
    import attn_backend
    from attn_backend import PagedKVCache, reference
    from attn_backend._validation import debug_checks_enabled

    results = []
    gen = torch.Generator(device="cuda").manual_seed(5)
    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)

    for layout in ("sglang", "vllm"):
        num_pages, page_size, heads, dim = 9, 16, 2, 128
        if layout == "sglang":
            cache = PagedKVCache.from_sglang(rand(num_pages * page_size, heads, dim),
                                             rand(num_pages * page_size, heads, dim), page_size)
        else:
            cache = PagedKVCache.from_vllm(rand(num_pages, heads, page_size, 2 * dim), dim)
        slots = torch.tensor([3, 140, -1, 0, 77], device="cuda")
        key, value = rand(5, heads, dim), rand(5, heads, dim)
        want = PagedKVCache(cache.k.clone(), cache.v.clone())
        reference.write_kv(want, slots, key, value)
        attn_backend.write_kv(cache, slots, key, value)
        ok = torch.equal(cache.k, want.k) and torch.equal(cache.v, want.v)
        print(f"{'ok' if ok else 'MISMATCH'}: kv write, {layout} layout", flush=True)
        results.append(ok)
        past = torch.tensor([num_pages * page_size + 40, 1 << 40, 5], device="cuda")
        before = debug_checks_enabled()
        attn_backend.set_debug_checks(False)
        try:
            attn_backend.write_kv(cache, past, key[:3], value[:3])  # skipped, never written
            torch.cuda.synchronize()
        finally:
            attn_backend.set_debug_checks(before)
        print(f"ran: kv write, {layout} layout, slots past the cache", flush=True)
    for fp8_dtype, per_head in ((torch.float8_e4m3fn, True), (torch.float8_e5m2, False)):
        num_pages, page_size, heads, dim = 9, 16, 2, 128
        scales = torch.rand(2, heads if per_head else 1, device="cuda", generator=gen) + 0.1
        k_scale, v_scale = (scales[0], scales[1]) if per_head else (scales[0, 0], scales[1, 0])
        cache = PagedKVCache.from_vllm(rand(num_pages, heads, page_size, 2 * dim).to(fp8_dtype),
                                       dim, k_scale=k_scale, v_scale=v_scale)
        slots = torch.tensor([3, 140, -1, 0, 77], device="cuda")
        key, value = rand(5, heads, dim) * 30, rand(5, heads, dim)
        want = PagedKVCache(cache.k.clone(), cache.v.clone(), k_scale, v_scale)
        reference.write_kv(want, slots, key, value)
        attn_backend.write_kv(cache, slots, key, value)
        ok = torch.equal(cache.k.view(torch.uint8), want.k.view(torch.uint8)) and \
            torch.equal(cache.v.view(torch.uint8), want.v.view(torch.uint8))
        print(f"{'ok' if ok else 'MISMATCH'}: quantising kv write, {fp8_dtype}", flush=True)
        results.append(ok)
    return results


def mla_mha_prefill() -> list[bool]:
    """MLA models' (192, 128) prefill shapes (mma, and wgmma on sm_90), against the reference."""
    from attn_backend import PagedKVCache, PagedPrefill, PageTable, reference
    from attn_backend.reference import KERNEL_TOLERANCE

    gen = torch.Generator().manual_seed(31)
    page_size, heads, q_lens, kv_lens = 16, 4, [300, 100], [600, 250]
    pages_per = [-(-n // page_size) for n in kv_lens]
    order = torch.randperm(sum(pages_per) + 2, generator=gen)
    table = torch.zeros(len(kv_lens), max(pages_per) + 1, dtype=torch.int32)
    slots, start = [], 0
    for r, count in enumerate(pages_per):
        pages = order[start:start + count]
        table[r, :count] = pages.int()
        t = torch.arange(kv_lens[r])
        slots.append(pages[t // page_size] * page_size + t % page_size)
        start += count
    num_slots = (sum(pages_per) + 2) * page_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).cuda()

    cache = PagedKVCache.from_sglang(rand(num_slots, heads, 192), rand(num_slots, heads, 128),
                                     page_size)
    q = rand(sum(q_lens), heads, 192)
    qo, kv_indptr = [0, 300, 400], [0, 600, 850]
    want = reference.attention(q, qo, cache, kv_indptr, torch.cat(slots).cuda())
    results = []
    for backend in ("mma", "wgmma") if torch.cuda.get_device_capability()[0] == 9 else ("mma",):
        prefill = PagedPrefill(num_qo_heads=heads, num_kv_heads=heads, head_dim=192,
                               head_dim_vo=128, dtype=torch.bfloat16, device="cuda",
                               max_batch_size=2, max_num_tokens=q.shape[0], backend=backend)
        prefill.plan(qo, kv_lens)
        out, lse = prefill.run(q, cache, PageTable.from_block_table(table.cuda()),
                               return_lse=True)
        tol = KERNEL_TOLERANCE[q.dtype]
        ok = bool(((out.float() - want.out).abs() <= tol + tol * want.out.abs()).all()) and \
            bool(torch.isclose(lse, want.lse, atol=2e-3, rtol=1e-3).all())
        print(f"{'ok' if ok else 'MISMATCH'}: mla models' mha prefill (192, 128), {backend}",
              flush=True)
        results.append(ok)
    return results


SECTIONS = {
    "attention": lambda: [check_case(name, case) for name, case in cases()],
    "mla_mha_prefill": mla_mha_prefill,
    "kv_writes": kv_writes,
    "bad_inputs": bad_inputs,
}


def main() -> None:
    import argparse

    from attn_backend import _extension

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"of {list(SECTIONS)}")
    args = parser.parse_args()
    _extension.load_ops()
    results = []
    for section in args.only.split(","):
        try:
            results += SECTIONS[section]()
        except Exception as error:  # the harness must go on to the next section
            print(f"MISMATCH: section {section} stopped: {type(error).__name__}: {error}",
                  flush=True)
            results.append(False)
    print(f"sanitizer cases: {sum(results)} of {len(results)} checks agree with the reference")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
