"""The paged decode kernel against the float reference, on the GPU."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import PagedDecode, PageTable, reference

from .helpers import (PagedProblem, allocate_pages, behind_slot_map, build_paged_problem,
                      check_against_reference, check_reads_of_prior_kernel_writes, make_cache)

pytestmark = pytest.mark.gpu



def build(kv_lens, **kwargs):
    """One query token per request (see helpers.build_paged_problem)."""
    return build_paged_problem([1] * len(kv_lens), kv_lens, **kwargs)


def check(decode, problem, page_table, q, *, window_left=-1, soft_cap=0.0, seed=None):
    check_against_reference(decode, problem, page_table, q, seed=seed, soft_cap=soft_cap,
                            window_left=window_left)


@pytest.mark.parametrize("layout", ["sglang", "vllm_nhd", "vllm_hnd"])
@pytest.mark.parametrize("page_size", [1, 16, 64, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_page_sizes_layouts_dtypes(layout, page_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1, 15, 16, 17, 300, 2049, int(torch.randint(1, 5000, (1,), generator=gen))]
    engine = "sglang" if layout == "sglang" else "vllm"
    problem, table, q = build(kv_lens, page_size=page_size, num_kv_heads=2, group=4,
                              head_dim=128, dtype=dtype, layout=layout, gen=gen, engine=engine)
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype,
                         device="cuda", max_batch_size=16)
    decode.plan(kv_lens)
    check(decode, problem, table, q, seed=seed)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window_left", [-1, 100])
def test_decode_through_a_slot_map(page_size, window_left, seed):
    """SGLang's hybrid pools: the table's slots reach the cache through slot_map."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1, 17, 300, 2049, 9000]
    problem, table, q = build(kv_lens, page_size=page_size, num_kv_heads=2, group=4,
                              head_dim=128, dtype=torch.bfloat16, layout="sglang", gen=gen,
                              engine="sglang")
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=8)
    decode.plan(kv_lens, window_left=window_left)
    check(decode, problem, behind_slot_map(table, gen), q, window_left=window_left, seed=seed)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8, 16])
def test_decode_head_dims_and_group_sizes(head_dim, group, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_lens = torch.randint(1, 3000, (9,), generator=gen).tolist()
    num_kv_heads = max(1, 16 // group)
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=num_kv_heads, group=group,
                              head_dim=head_dim, dtype=torch.bfloat16, layout="vllm_nhd", gen=gen)
    decode = PagedDecode(num_qo_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, dtype=torch.bfloat16, device="cuda", max_batch_size=9)
    decode.plan(kv_lens)
    check(decode, problem, table, q, seed=seed)


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(32, 1), (64, 1), (128, 1), (96, 2),
                                                        (17, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_large_gqa_groups(num_qo_heads, num_kv_heads, dtype, seed):
    """Groups above one 16-row tile (MQA models, 32..128 query heads per kv head) run as row
    tiles of the group's heads over the same keys; split-KV merges each row tile's partials."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1, 40, 3000, 33000, int(torch.randint(1, 9000, (1,), generator=gen))]
    group = num_qo_heads // num_kv_heads
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=num_kv_heads, group=group,
                              head_dim=128, dtype=dtype, layout="sglang", gen=gen,
                              engine="sglang")
    decode = PagedDecode(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=128,
                         dtype=dtype, device="cuda", max_batch_size=8)
    decode.plan(kv_lens)
    assert decode.planned_schedule().num_partials > 0  # the 33k request is split
    check(decode, problem, table, q, soft_cap=30.0, seed=seed)
    decode.plan(kv_lens, window_left=2000)
    check(decode, problem, table, q, window_left=2000, seed=seed)


def test_decode_refuses_element_types_it_does_not_compile():
    with pytest.raises(TypeError, match=r"kv_dtype float16 with dtype bfloat16; compiled"):
        PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                    kv_dtype=torch.float16, device="cuda")
    with pytest.raises(TypeError, match="dtype float32; accepted: float16, bfloat16"):
        PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.float32,
                    device="cuda")
    with pytest.raises(ValueError, match="group size .* 256; supported: 1..128"):
        PagedDecode(num_qo_heads=256, num_kv_heads=1, head_dim=128, dtype=torch.bfloat16,
                    device="cuda")


@pytest.mark.parametrize("kv_lens", [[32768], [1, 32768, 5], [12000] * 3],
                         ids=["b1x32k", "mixed_with_32k", "b3x12k"])
@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (-1, 30.0), (4095, 0.0), (100, 50.0)])
def test_decode_split_kv_long_contexts_window_softcap(kv_lens, window_left, soft_cap, seed):
    gen = torch.Generator().manual_seed(seed)
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=8, group=4, head_dim=128,
                              dtype=torch.bfloat16, layout="sglang", gen=gen, engine="sglang")
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=4)
    decode.plan(kv_lens, window_left=window_left)
    check(decode, problem, table, q, window_left=window_left, soft_cap=soft_cap, seed=seed)


@pytest.mark.parametrize("batch", [1, 64, 512])
def test_decode_batch_sizes(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    high = {1: 20000, 64: 4000, 512: 600}[batch]
    kv_lens = torch.randint(1, high, (batch,), generator=gen).tolist()
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=8, group=4, head_dim=128,
                              dtype=torch.bfloat16, layout="vllm_nhd", gen=gen)
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=512)
    decode.plan(kv_lens)
    check(decode, problem, table, q, seed=seed)


FIRST_FULL_BATCH = -1  # stands for the smallest batch that runs the full-batch CTA shape


def first_full_batch(decode: PagedDecode) -> int:
    """The smallest batch whose whole requests fill the deep CTA shape's slots."""
    return -(-decode.cta_slots // decode.num_kv_heads)


@pytest.mark.parametrize("layout, page_size", [("sglang", 1), ("vllm_nhd", 16), ("vllm_hnd", 7),
                                               ("sglang", 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (100, 30.0)])
def test_decode_full_batch_shape(layout, page_size, dtype, window_left, soft_cap, seed):
    """From the first batch that fills the GPU with whole requests, d128 runs its
    full-batch CTA shape (kernels/csrc/decode_kernels.cu); one request less, the deep one."""
    gen = torch.Generator().manual_seed(seed)
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype,
                         device="cuda", max_batch_size=512)
    assert decode.full_batch_cta_slots > decode.cta_slots
    batch = first_full_batch(decode)
    engine = "sglang" if layout == "sglang" else "vllm"
    for rows, full in ((batch, True), (batch - 1, False)):
        kv_lens = torch.randint(1, 2500, (rows,), generator=gen).tolist()
        problem, table, q = build(kv_lens, page_size=page_size, num_kv_heads=8, group=4,
                                  head_dim=128, dtype=dtype, layout=layout, gen=gen,
                                  engine=engine)
        decode.plan(kv_lens, window_left=window_left)
        assert decode._planned.full_batch == full
        check(decode, problem, table, q, window_left=window_left, soft_cap=soft_cap, seed=seed)
        # Either shape can be asked for at any batch size (backend=), for tests and sweeps.
        forced = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype,
                             device="cuda", max_batch_size=512,
                             backend="split" if full else "full_batch")
        forced.plan(kv_lens, window_left=window_left)
        assert forced._planned.full_batch == (not full)
        check(forced, problem, table, q, window_left=window_left, soft_cap=soft_cap, seed=seed)


@pytest.mark.parametrize("batch", [6, FIRST_FULL_BATCH], ids=["b6", "first_full_batch"])
def test_decode_graph_replays_with_new_lengths(batch, seed):
    """One capture per batch size, replayed for lengths that do and do not split; the
    first full batch replays the full-batch CTA shape."""
    gen = torch.Generator().manual_seed(seed)
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=512, use_cuda_graph=True)
    batch = first_full_batch(decode) if batch == FIRST_FULL_BATCH else batch
    page_size, max_len = 16, 20000 if batch < 8 else 4000
    num_pages = batch * (max_len // page_size + 1) + 4
    cache = make_cache("sglang", num_pages, page_size, 8, 128, 128, torch.bfloat16, "cuda", gen)
    rows = torch.arange(1, batch + 1)
    req_to_token = torch.zeros(batch + 1, max_len + page_size, dtype=torch.int32, device="cuda")
    table = PageTable.from_req_to_token(req_to_token, rows.cuda())
    q = torch.empty(batch, 32, 128, dtype=torch.bfloat16, device="cuda")
    # The graph computes q with a kernel right before the decode, as a model does: with
    # PDL the decode starts while that kernel runs and must still read its result.
    q_source = torch.empty_like(q)
    out = torch.empty_like(q)

    def refresh(kv_lens):
        pages, _ = allocate_pages(kv_lens, page_size, gen, spare_pages=num_pages - sum(
            (n + page_size - 1) // page_size for n in kv_lens))
        problem = PagedProblem(cache, pages, kv_lens, [1] * batch)
        req_to_token.zero_()
        for r in range(batch):
            req_to_token[rows[r], : kv_lens[r]] = problem.slots(r).int().cuda()
        q_source.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        q.fill_(float("nan"))
        decode.plan(kv_lens)
        return problem

    def step():
        torch.mul(q_source, 1, out=q)
        decode.run(q, cache, table, out=out)

    refresh([100] * batch)
    step()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    mixed = torch.randint(1, max_len, (batch,), generator=gen).tolist()
    mixed[:3] = [max_len - 1, 1, 7]
    for kv_lens in (list(range(1, batch + 1)), mixed, [max_len] * batch):
        problem = refresh(kv_lens)
        assert decode._planned.full_batch == (batch >= first_full_batch(decode))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        kv_indptr, kv_slots = problem.kv_csr()
        want = reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"seed={seed} lens={kv_lens}: {m}")


@pytest.mark.parametrize("batch, max_len", [(4, 20000), (64, 2000)], ids=["split", "full"])
def test_decode_reads_what_the_kernel_before_it_wrote(batch, max_len, seed):
    """Programmatic dependent launch: the query, K, V or page table written by the kernel
    right before the decode (helpers.check_reads_of_prior_kernel_writes)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator().manual_seed(seed)
    kv_lens = torch.randint(1, max_len, (batch,), generator=gen).tolist()
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=8, group=4, head_dim=128,
                              dtype=torch.bfloat16, layout="vllm_nhd", gen=gen)
    with_pdl, without_pdl = (
        PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                    device="cuda", max_batch_size=batch, enable_pdl=enable_pdl)
        for enable_pdl in (True, False))
    for decode in (with_pdl, without_pdl):
        decode.plan(kv_lens)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, problem.qo_indptr(), problem.cache, kv_indptr, kv_slots)
    check_reads_of_prior_kernel_writes(
        lambda decode: decode.run(q, problem.cache, table, out=torch.full_like(q, float("nan"))),
        with_pdl, without_pdl,
        {"q": q, "k": problem.cache.k, "v": problem.cache.v, "page table": table.table}, want,
        seed)


def small_planned_decode(kv_lens, seed):
    """Two requests, GQA 8/2, d64, bf16, planned: (problem, page table, q, decode)."""
    gen = torch.Generator().manual_seed(seed)
    problem, table, q = build(kv_lens, page_size=16, num_kv_heads=2, group=4, head_dim=64,
                              dtype=torch.bfloat16, layout="vllm_nhd", gen=gen)
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=len(kv_lens))
    decode.plan(kv_lens)
    return problem, table, q, decode


def test_decode_empty_request_gives_zero_and_minus_inf(seed):
    problem, table, q, decode = small_planned_decode([0, 50], seed)
    out, lse = decode.run(q, problem.cache, table, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(out[1].float()).all() and torch.isfinite(lse[1]).all()


def test_decode_rejects_bad_gpu_inputs(seed):
    problem, table, q, decode = small_planned_decode([40, 50], seed)
    with pytest.raises(TypeError, match="q has dtype float16; accepted: bfloat16"):
        decode.run(q.half(), problem.cache, table)
    with pytest.raises(ValueError, match="q is on cpu .* page_table is on cuda|on one device"):
        decode.run(q.cpu(), problem.cache, table)
    bad = PageTable.from_block_table(table.table.clone())
    bad.table[1, 0] = problem.cache.num_pages + 5
    with pytest.raises(ValueError, match="page ids in page_table holds values"):
        decode.run(q, problem.cache, bad)


def test_back_to_back_plans_while_the_gpu_is_behind(seed):
    """plan() refills one of two pinned staging buffers only after the copy that last read it
    has run: with the GPU held back by a long kernel, six plans and runs queued without a sync
    must each reach the device with their own schedule."""
    gen = torch.Generator().manual_seed(seed)
    decode = PagedDecode(num_qo_heads=16, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=8)
    cases = []
    for step in range(6):
        kv_lens = torch.randint(1, 6000, (int(torch.randint(1, 9, (1,), generator=gen)),),
                                generator=gen).tolist()
        problem, table, q = build(kv_lens, page_size=16, num_kv_heads=4, group=4, head_dim=128,
                                  dtype=torch.bfloat16, layout="vllm_nhd", gen=gen)
        cases.append((problem, table, q))
    torch.cuda.synchronize()
    attn_backend.set_debug_checks(False)  # their checks synchronise with the GPU
    try:
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time queued ahead of everything
        outputs = []
        for problem, table, q in cases:
            decode.plan(problem.kv_lens)
            outputs.append(decode.run(q, problem.cache, table))
    finally:
        attn_backend.set_debug_checks(True)
    torch.cuda.synchronize()
    for (problem, table, q), out in zip(cases, outputs):
        kv_indptr, kv_slots = problem.kv_csr()
        want = reference.attention(q, problem.qo_indptr(), problem.cache, kv_indptr, kv_slots)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"seed={seed}: {m}")
