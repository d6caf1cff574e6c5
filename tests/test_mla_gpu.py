"""The MLA latent kernel (absorbed form: one 576-wide latent row per token, V its first 512
values) against the float reference: decode and verify (causal chains, tree masks), heads
16..128, page sizes 1/7/16/64 on shuffled pages, both engines' table forms, split-KV on long
contexts, CUDA-graph replay with new lengths, FP8 latent caches (e4m3, e5m2; scales as floats
and as device tensors read at replay); each on the mma.sync kernels and on the warpgroup
(wgmma) one where the GPU runs it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_backend import PagedKVCache, PagedPrefill

from .helpers import PagedProblem, allocate_pages, check_against_reference, engine_page_table

pytestmark = pytest.mark.gpu

RANK, ROPE = 512, 64


def mla_problem(q_lens, kv_lens, *, heads, page_size, seed, dtype=torch.bfloat16,
                engine="vllm", kv_dtype=None, scale=None):
    """`kv_dtype` an FP8 format: the latent rows stored in it, read with `scale`."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_pages = allocate_pages(kv_lens, page_size, gen)
    latent = torch.randn(num_pages * page_size, 1, RANK + ROPE, generator=gen)
    latent = latent.to(kv_dtype or dtype).cuda()
    cache = PagedKVCache.from_mla(latent, RANK, page_size, scale=scale)
    problem = PagedProblem(cache, tables, list(kv_lens), list(q_lens))
    page_table = engine_page_table(problem, engine, gen, "cuda")
    q = torch.randn(sum(q_lens), heads, RANK + ROPE, generator=gen).to(dtype).cuda()
    return problem, page_table, q


@pytest.fixture(params=["mma", "wgmma", "seesaw"])
def latent_backend(request):
    if request.param != "mma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"the {request.param} MLA kernel runs on sm_90 GPUs")
    return request.param


MLA_CONFIGS = {"mma": {"prefill_mla", "prefill_mla_wide"}, "wgmma": {"prefill_mla_wgmma"},
               "seesaw": {"prefill_mla_seesaw"}}


def skip_fp8_on_seesaw(backend):
    if backend == "seesaw":
        pytest.skip("the seesaw kernel reads 16-bit latent caches (FP8 ones are refused)")


def make_mla(q, problem, backend, **kwargs):
    return PagedPrefill(num_qo_heads=q.shape[1], num_kv_heads=1, head_dim=RANK + ROPE,
                        head_dim_vo=RANK, dtype=q.dtype, kv_dtype=problem.cache.dtype,
                        device="cuda",
                        max_batch_size=max(8, len(problem.kv_lens)),
                        max_num_tokens=max(64, q.shape[0]), backend=backend, **kwargs)


def planned_kernel(mla) -> str:
    return mla._planned.config.name


def qo_indptr(q_lens):
    return [0] + torch.tensor(q_lens).cumsum(0).tolist()


def captured_run(mla, q, cache, table):
    """The planned run, once eagerly (a warm-up) and captured in a CUDA graph: (out, graph)."""
    out = torch.empty(q.shape[0], q.shape[1], RANK, dtype=q.dtype, device="cuda")
    mla.run(q, cache, table, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla.run(q, cache, table, out=out)
    return out, graph


def random_tree_masks(q_lens, kv_lens, seed) -> torch.Tensor:
    """Tree verification masks, request blocks back to back: each draft sees the prefix, itself
    and a random set of earlier drafts."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for n, length in zip(q_lens, kv_lens):
        block = torch.ones(n, length, dtype=torch.bool)
        drafts = torch.rand(n, n, generator=gen) < 0.5
        block[:, length - n:] = torch.tril(drafts, diagonal=-1) | torch.eye(n, dtype=torch.bool)
        blocks.append(block.flatten())
    return torch.cat(blocks)


@pytest.mark.parametrize("heads", [16, 32, 128])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_mla_decode(heads, page_size, engine, seed, latent_backend):
    kv_lens = [1, 17, 300, 2049, 64, 5000]
    q_lens = [1] * len(kv_lens)
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=page_size,
                                    seed=seed, engine=engine)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    assert planned_kernel(mla) in MLA_CONFIGS[latent_backend]
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("page_size", [1, 64])
def test_mla_every_tile_count_around_the_tile_edges(heads, page_size, seed, latent_backend):
    """Requests of 1 to 8 tiles of 64 keys, at and around each edge: the seesaw kernel's
    tails (one tile, an odd count, the pair before a last single tile) and its steady pairs,
    and the other kernels' partial last tiles."""
    kv_lens = [63, 64, 65, 128, 129, 192, 193, 256, 257, 320, 384, 449, 512]
    q_lens = [1] * len(kv_lens)
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=page_size,
                                    seed=seed)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    assert planned_kernel(mla) in MLA_CONFIGS[latent_backend]
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_verify_chains(heads, dtype, seed, latent_backend):
    """Speculative verify with a chain of drafts: q_len 2..8, causal over the drafts."""
    q_lens = [2, 4, 8, 3, 1]
    kv_lens = [40, 1000, 64, 9, 3000]
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=16, seed=seed,
                                    dtype=dtype)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


@pytest.mark.parametrize("heads", [16, 64])
def test_mla_tree_masks(heads, seed, latent_backend):
    """Tree verification: each draft sees the prefix and a random set of earlier drafts."""
    q_lens, kv_lens = [4, 8, 6], [100, 37, 2000]
    mask = random_tree_masks(q_lens, kv_lens, seed)
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=64, seed=seed)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens, custom_mask=mask)
    check_against_reference(mla, problem, table, q, seed=seed, custom_mask=mask.cuda())


@pytest.mark.parametrize("kv_lens", [[32768], [20000, 15], [32768, 32768]])
def test_mla_split_kv_long_contexts(kv_lens, seed, latent_backend):
    """Few requests on long contexts: the plan splits their keys; the last chunk merges."""
    q_lens = [1] * len(kv_lens)
    problem, table, q = mla_problem(q_lens, kv_lens, heads=16, page_size=64, seed=seed)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    assert mla._planned.plan["num_work_items"] > len(kv_lens)  # split
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


def test_mla_graph_replay_with_new_lengths(seed, latent_backend):
    batch, heads = 4, 16
    longest = [3000] * batch
    problem, table, q = mla_problem([1] * batch, longest, heads=heads, page_size=16, seed=seed)
    mla = make_mla(q, problem, latent_backend, use_cuda_graph=True)
    mla.plan(qo_indptr([1] * batch), longest)
    out, graph = captured_run(mla, q, problem.cache, table)
    from attn_backend import reference

    for lengths in ([1, 2999, 64, 700], [3000, 3000, 3000, 3000], [5, 6, 7, 8]):
        mla.plan(qo_indptr([1] * batch), lengths)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        shorter = PagedProblem(problem.cache, problem.page_table, lengths, [1] * batch)
        kv_indptr, kv_slots = shorter.kv_csr()
        want = reference.attention(q, shorter.qo_indptr(), problem.cache, kv_indptr, kv_slots)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"lengths={lengths}: {m}")


def test_auto_chooses_the_mla_kernel_by_rows_per_request(seed):
    """The default where the GPU runs the warpgroup kernels: up to 16 rows per request (a
    decode of 16 heads) on the 16-row mma.sync kernel, up to 64 (16 heads x 2 or 4 drafts) on
    the 32-key wgmma kernel, more (128 heads, 16 heads x 8 tokens) on the seesaw one."""
    wgmma = torch.cuda.get_device_capability()[0] == 9
    for heads, q_len, want in ((16, 1, "prefill_mla"), (16, 2, "prefill_mla_wgmma"),
                               (16, 4, "prefill_mla_wgmma"), (16, 8, "prefill_mla_seesaw"),
                               (128, 1, "prefill_mla_seesaw")):
        problem, table, q = mla_problem([q_len] * 2, [300, 2000], heads=heads, page_size=16,
                                        seed=seed)
        mla = make_mla(q, problem, "auto")
        mla.plan(qo_indptr([q_len] * 2), [300, 2000])
        assert planned_kernel(mla) == (want if wgmma else
                                       ("prefill_mla" if heads * q_len <= 16 else
                                        "prefill_mla_wide")), (heads, q_len)
        check_against_reference(mla, problem, table, q, seed=seed, causal=True)


FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_scale(kind: str):
    """An FP8 latent cache's one scale: a host float, or a 0-d device tensor."""
    return 0.37 if kind == "float" else torch.tensor(1.7, device="cuda")



def test_auto_keeps_fp8_latent_caches_on_the_32_key_wgmma_kernel(seed):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma MLA kernels run on sm_90 GPUs")
    problem, table, q = mla_problem([1, 1], [300, 2000], heads=128, page_size=16, seed=seed,
                                    kv_dtype=torch.float8_e4m3fn, scale=0.5)
    mla = make_mla(q, problem, "auto")
    mla.plan(qo_indptr([1, 1]), [300, 2000])
    assert planned_kernel(mla) == "prefill_mla_wgmma"
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)

@pytest.mark.parametrize("fmt", FP8_FORMATS)
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_mla_fp8_decode(fmt, heads, page_size, scale_kind, seed, latent_backend):
    skip_fp8_on_seesaw(latent_backend)
    kv_lens = [1, 17, 300, 2049, 64, 5000]
    q_lens = [1] * len(kv_lens)
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=page_size,
                                    seed=seed, kv_dtype=FP8_FORMATS[fmt],
                                    scale=fp8_scale(scale_kind))
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    assert planned_kernel(mla) in MLA_CONFIGS[latent_backend]
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


@pytest.mark.parametrize("fmt", FP8_FORMATS)
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_fp8_verify_chains_and_trees(fmt, heads, dtype, seed, latent_backend):
    skip_fp8_on_seesaw(latent_backend)
    q_lens, kv_lens = [2, 4, 8, 1], [40, 1000, 64, 3000]
    problem, table, q = mla_problem(q_lens, kv_lens, heads=heads, page_size=16, seed=seed,
                                    dtype=dtype, kv_dtype=FP8_FORMATS[fmt], scale=0.8)
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr(q_lens), kv_lens)
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)
    mask = random_tree_masks(q_lens, kv_lens, seed)
    mla.plan(qo_indptr(q_lens), kv_lens, custom_mask=mask)
    check_against_reference(mla, problem, table, q, seed=seed, custom_mask=mask.cuda())


@pytest.mark.parametrize("heads", [16, 128])
def test_mla_fp8_split_kv_long_context(heads, seed, latent_backend):
    skip_fp8_on_seesaw(latent_backend)
    kv_lens = [32768, 20000]
    problem, table, q = mla_problem([1, 1], kv_lens, heads=heads, page_size=64, seed=seed,
                                    kv_dtype=torch.float8_e4m3fn, scale=fp8_scale("tensor"))
    mla = make_mla(q, problem, latent_backend)
    mla.plan(qo_indptr([1, 1]), kv_lens)
    assert mla._planned.plan["num_work_items"] > len(kv_lens)  # split
    check_against_reference(mla, problem, table, q, seed=seed, causal=True)


def test_mla_fp8_graph_reads_the_scale_at_replay(seed, latent_backend):
    """A captured graph reads the device scale when it replays: vLLM and SGLang replace or
    update the layers' scales after capture."""
    skip_fp8_on_seesaw(latent_backend)
    from attn_backend import reference

    batch, heads, kv_lens = 3, 128, [700, 33, 2500]
    scale = torch.tensor(0.5, device="cuda")
    problem, table, q = mla_problem([1] * batch, kv_lens, heads=heads, page_size=16,
                                    seed=seed, kv_dtype=torch.float8_e4m3fn, scale=scale)
    mla = make_mla(q, problem, latent_backend, use_cuda_graph=True)
    mla.plan(qo_indptr([1] * batch), kv_lens)
    out, graph = captured_run(mla, q, problem.cache, table)
    kv_indptr, kv_slots = problem.kv_csr()
    for value in (0.5, 2.25):
        scale.fill_(value)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        cache = dataclasses.replace(problem.cache, k_scale=value, v_scale=value)
        want = reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"scale={value}: {m}")


def test_mla_refuses_a_value_cache_apart_from_the_keys(seed, latent_backend):
    problem, table, q = mla_problem([1], [40], heads=16, page_size=16, seed=seed)
    apart = PagedKVCache(problem.cache.k, problem.cache.k[..., :RANK].clone())
    mla = make_mla(q, problem, latent_backend)
    mla.plan([0, 1], [40])
    with pytest.raises(ValueError, match="reads V as the first 512 columns"):
        mla.run(q, apart, table)


@pytest.mark.parametrize("backend", ["mma", "wgmma"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("causal", [True, False], ids=["new_tokens", "prefix_chunk"])
def test_mha_prefill_of_mla_models(backend, page_size, causal, seed):
    """The (192, 128) prefill shapes of MLA models' MHA path: causal over new tokens (and a
    cached prefix, as one-shot), or non-causal over a prefix chunk, with LSE for the merge."""
    if backend == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel runs on sm_90 GPUs")
    gen = torch.Generator().manual_seed(seed)
    heads = 16
    q_lens, kv_lens = ([300, 1, 77, 1000], [300, 513, 77, 2100]) if causal else \
        ([50, 3, 200], [4096, 10, 700])
    tables, num_pages = allocate_pages(kv_lens, page_size, gen)
    k = torch.randn(num_pages * page_size, heads, 192, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(num_pages * page_size, heads, 128, generator=gen).to(torch.bfloat16).cuda()
    cache = PagedKVCache.from_sglang(k, v, page_size)
    problem = PagedProblem(cache, tables, kv_lens, q_lens)
    q = torch.randn(sum(q_lens), heads, 192, generator=gen).to(torch.bfloat16).cuda()
    prefill = PagedPrefill(num_qo_heads=heads, num_kv_heads=heads, head_dim=192, head_dim_vo=128,
                           dtype=torch.bfloat16, device="cuda", max_batch_size=8,
                           max_num_tokens=sum(q_lens), backend=backend)
    prefill.plan(qo_indptr(q_lens), kv_lens, causal=causal)
    check_against_reference(prefill, problem, engine_page_table(problem, "vllm", gen, "cuda"),
                            q, seed=seed, causal=causal)
