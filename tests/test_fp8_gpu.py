"""The decode and prefill kernels on FP8 caches (float8_e4m3fn, float8_e5m2) against the float
reference, which reads them dequantised; scales per tensor and per kv head, as floats and as
device tensors read at CUDA-graph replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_backend import PagedDecode, PagedPrefill, reference
from attn_backend.kernel_configs import find

from .helpers import build_paged_problem, check_against_reference

pytestmark = pytest.mark.gpu

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMATS = [E4M3, E5M2]


def scales(kind: str, num_kv_heads: int, gen: torch.Generator):
    """K and V scales of one kind: a float, a 0-d device tensor, or one per kv head."""
    if kind == "float":
        return 0.37, 1.9
    if kind == "tensor":
        return torch.tensor(0.61, device="cuda"), torch.tensor(0.043, device="cuda")
    per_head = torch.rand(2, num_kv_heads, generator=gen) * 2 + 0.05
    return per_head[0].cuda(), per_head[1].cuda()


def fp8_problem(q_lens, kv_lens, *, kv_dtype, scale_kind, seed, dtype=torch.bfloat16,
                page_size=16, num_kv_heads=2, group=4, head_dim=128, layout="vllm_nhd"):
    gen = torch.Generator().manual_seed(seed)
    engine = "sglang" if layout == "sglang" else "vllm"
    problem, table, q = build_paged_problem(
        q_lens, kv_lens, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
        head_dim=head_dim, dtype=dtype, layout=layout, gen=gen, engine=engine,
        kv_dtype=kv_dtype)
    k_scale, v_scale = scales(scale_kind, num_kv_heads, gen)
    problem.cache = dataclasses.replace(problem.cache, k_scale=k_scale, v_scale=v_scale)
    return problem, table, q


def make_decode(q, problem, **kwargs):
    return PagedDecode(num_qo_heads=q.shape[1], num_kv_heads=problem.cache.num_kv_heads,
                       head_dim=q.shape[2], dtype=q.dtype, kv_dtype=problem.cache.dtype,
                       device="cuda", max_batch_size=max(8, len(problem.kv_lens)), **kwargs)


def make_prefill(q, problem, **kwargs):
    return PagedPrefill(num_qo_heads=q.shape[1], num_kv_heads=problem.cache.num_kv_heads,
                        head_dim=q.shape[2], dtype=q.dtype, kv_dtype=problem.cache.dtype,
                        device="cuda", max_batch_size=len(problem.kv_lens),
                        max_num_tokens=max(1, q.shape[0]), **kwargs)


@pytest.mark.parametrize("kv_dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "per_head"])
def test_fp8_decode(kv_dtype, dtype, page_size, scale_kind, seed):
    kv_lens = [1, 17, 300, 2049, 40, 5000]
    problem, table, q = fp8_problem([1] * len(kv_lens), kv_lens, kv_dtype=kv_dtype,
                                    scale_kind=scale_kind, seed=seed, dtype=dtype,
                                    page_size=page_size)
    decode = make_decode(q, problem)
    decode.plan(kv_lens)
    check_against_reference(decode, problem, table, q, seed=seed)


@pytest.mark.parametrize("kv_dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("layout", ["sglang", "vllm_nhd", "vllm_hnd"])
def test_fp8_decode_head_dims_layouts_groups(kv_dtype, head_dim, layout, seed):
    kv_lens = [33, 1000, 7, 20000]
    for num_kv_heads, group in ((2, 8), (1, 32)):
        problem, table, q = fp8_problem([1] * len(kv_lens), kv_lens, kv_dtype=kv_dtype,
                                        scale_kind="per_head", seed=seed, head_dim=head_dim,
                                        layout=layout, num_kv_heads=num_kv_heads, group=group)
        decode = make_decode(q, problem)
        decode.plan(kv_lens, window_left=3000 if head_dim == 128 else -1)
        check_against_reference(decode, problem, table, q, seed=seed,
                                window_left=3000 if head_dim == 128 else -1)


@pytest.mark.parametrize("backend", ["split", "full_batch"])
def test_fp8_decode_both_cta_shapes_softcap(backend, seed):
    kv_lens = torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(seed)).tolist()
    problem, table, q = fp8_problem([1] * len(kv_lens), kv_lens, kv_dtype=E4M3,
                                    scale_kind="per_head", seed=seed, num_kv_heads=8, group=4)
    decode = make_decode(q, problem, backend=backend)
    decode.plan(kv_lens)
    check_against_reference(decode, problem, table, q, seed=seed, soft_cap=30.0)


# Prefills, extends on prefixes, single-token rows and partial tiles; then verify-like rows.
MIXED = ([1, 5, 17, 200, 1, 64, 333], [1, 300, 17, 2049, 1000, 70, 333])
SHORT = ([1, 4, 3, 2], [900, 40, 3000, 7])


@pytest.fixture(params=["wgmma", "mma"])
def long_tiles(request):
    """Each long-query kernel: wgmma (sm_90 GPUs; FP8 tiles turned into float16 tiles in shared
    memory) and mma.sync (FP8 fragments converted in registers)."""
    if request.param == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel runs on sm_90 GPUs")
    return request.param


@pytest.mark.parametrize("kv_dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [MIXED, SHORT], ids=["mixed", "short"])
@pytest.mark.parametrize("scale_kind", ["float", "per_head"])
def test_fp8_prefill(kv_dtype, dtype, lengths, scale_kind, long_tiles, seed):
    for page_size, head_dim in ((1, 128), (16, 64), (64, 256)):
        if long_tiles == "wgmma" and find("prefill_wgmma", head_dim, head_dim) is None:
            continue  # d256 has no wgmma shape
        problem, table, q = fp8_problem(*lengths, kv_dtype=kv_dtype, scale_kind=scale_kind,
                                        seed=seed, dtype=dtype, page_size=page_size,
                                        head_dim=head_dim, layout="sglang")
        prefill = make_prefill(q, problem, backend=long_tiles)
        prefill.plan([0] + torch.tensor(lengths[0]).cumsum(0).tolist(), lengths[1])
        check_against_reference(prefill, problem, table, q, seed=seed, causal=True)


@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (700, 30.0)])
def test_fp8_prefill_long_split_kv_window_softcap(window_left, soft_cap, long_tiles, seed):
    q_lens, kv_lens = [3000, 8, 1], [9000, 12000, 20000]
    problem, table, q = fp8_problem(q_lens, kv_lens, kv_dtype=E4M3, scale_kind="per_head",
                                    seed=seed, num_kv_heads=4, group=8)
    prefill = make_prefill(q, problem, backend=long_tiles)
    prefill.plan([0] + torch.tensor(q_lens).cumsum(0).tolist(), kv_lens,
                 window_left=window_left)
    check_against_reference(prefill, problem, table, q, seed=seed, causal=True,
                            window_left=window_left, soft_cap=soft_cap)


def test_fp8_prefill_tree_masks(long_tiles, seed):
    """Speculative verification: each request's drafts see a random tree over its prefix."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, kv_lens = [4, 7, 1, 6], [500, 31, 2000, 6]
    problem, table, q = fp8_problem(q_lens, kv_lens, kv_dtype=E5M2, scale_kind="tensor",
                                    seed=seed, group=8)
    masks = []
    for n, kv in zip(q_lens, kv_lens):
        block = torch.rand(n, kv, generator=gen) < 0.6
        block[:, : kv - n] = True
        block[torch.arange(n), kv - n + torch.arange(n)] = True
        masks.append(block.flatten())
    mask = torch.cat(masks)
    prefill = make_prefill(q, problem, backend=long_tiles)
    prefill.plan([0] + torch.tensor(q_lens).cumsum(0).tolist(), kv_lens, custom_mask=mask)
    check_against_reference(prefill, problem, table, q, seed=seed, custom_mask=mask)


def test_fp8_matches_the_16_bit_kernel_on_the_dequantised_cache(seed):
    """Scales that are powers of two make the dequantised cache exact in bfloat16: the FP8
    kernels and the bf16 kernels on that cache then do the same arithmetic."""
    kv_lens = [5, 900, 4097]
    problem, table, q = fp8_problem([1] * 3, kv_lens, kv_dtype=E4M3, scale_kind="float",
                                    seed=seed)
    cache = dataclasses.replace(problem.cache, k_scale=0.5, v_scale=4.0)
    exact = dataclasses.replace(cache, k=(cache.k.float() * 0.5).bfloat16(),
                                v=(cache.v.float() * 4.0).bfloat16(), k_scale=None, v_scale=None)
    fp8_decode, bf16_decode = make_decode(q, problem), make_decode(q, dataclasses.replace(
        problem, cache=exact))
    fp8_decode.plan(kv_lens)
    bf16_decode.plan(kv_lens)
    got = fp8_decode.run(q, cache, table)
    want = bf16_decode.run(q, exact, table)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_fp8_decode_graph_reads_device_scales_at_replay(seed):
    """A device scale tensor is read by each replay: new values in the same tensor change the
    replayed output as the reference says."""
    kv_lens = [100, 3000, 1, 20000]
    problem, table, q = fp8_problem([1] * 4, kv_lens, kv_dtype=E4M3, scale_kind="per_head",
                                    seed=seed)
    cache = problem.cache
    decode = make_decode(q, problem, use_cuda_graph=True)
    decode.plan(kv_lens)
    out = torch.empty_like(q)
    decode.run(q, cache, table, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode.run(q, cache, table, out=out)
    kv_indptr, kv_slots = problem.kv_csr()
    for k_values, v_values in (([0.2, 3.0], [0.7, 0.01]), ([1.0, 1.0], [2.0, 0.5])):
        cache.k_scale.copy_(torch.tensor(k_values))
        cache.v_scale.copy_(torch.tensor(v_values))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        fresh = dataclasses.replace(cache)  # a new object: the reference reads the new values
        want = reference.attention(q, problem.qo_indptr(), fresh, kv_indptr, kv_slots)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"seed={seed} scales={k_values, v_values}: {m}")


def test_fp8_refusals():
    with pytest.raises(TypeError, match="dtype float8_e4m3fn; accepted: float16, bfloat16"):
        PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=E4M3, device="cuda")
    with pytest.raises(ValueError, match=r"k_scale has shape \(3,\); accepted"):
        dataclasses.replace(
            fp8_problem([1], [5], kv_dtype=E4M3, scale_kind="float", seed=0)[0].cache,
            k_scale=torch.ones(3, device="cuda"))


def test_fp8_debug_checks_refuse_bad_device_scales(seed):
    """Device scales are read on the device; with debug checks on, run() reads them first and
    refuses zero, negative or non-finite values by name."""
    problem, table, q = fp8_problem([1, 1], [40, 7], kv_dtype=E4M3, scale_kind="per_head",
                                    seed=seed)
    decode = make_decode(q, problem)
    decode.plan([40, 7])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        scale = problem.cache.k_scale.clone()
        scale[1] = bad
        with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
            decode.run(q, dataclasses.replace(problem.cache, k_scale=scale), table)


@pytest.mark.parametrize("kind", ["decode", "mma", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_peaked_softmax_at_head_dim_128(kind, dtype, seed):
    """Large logits (query x4, K scale 3) at head dim 128, whose sm_scale 1/sqrt(128) is no
    power of two: the query's float16 conversion must not round q * sm_scale (the fuzz found
    output errors of 2-8 bfloat16 ulps that way); the 16-bit tolerances hold."""
    kv_lens = [3, 16, 300, 2049]
    q_lens = [1] * len(kv_lens) if kind == "decode" else [3, 16, 77, 129]
    problem, table, q = fp8_problem(q_lens, kv_lens, kv_dtype=E4M3, scale_kind="float",
                                    seed=seed, dtype=dtype, num_kv_heads=4, group=8)
    problem.cache = dataclasses.replace(problem.cache, k_scale=3.0, v_scale=2.5)
    q = (q.float() * 4).to(dtype)
    if kind == "decode":
        wrapper = make_decode(q, problem)
        wrapper.plan(kv_lens)
        check_against_reference(wrapper, problem, table, q, seed=seed)
    else:
        if kind == "wgmma" and find("prefill_wgmma", 128, 128) is None:
            pytest.skip("no prefill_wgmma kernel")
        wrapper = make_prefill(q, problem, backend=kind)
        wrapper.plan([0] + torch.tensor(q_lens).cumsum(0).tolist(), kv_lens)
        check_against_reference(wrapper, problem, table, q, seed=seed, causal=True)
