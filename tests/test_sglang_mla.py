"""MLA models (DeepSeek-class) through the SGLang backend on CPU (the float reference): SGLang's
own MLA attention kit (its tiny DeepSeek attention, the real MLATokenToKVPool, shuffled pages)
and the MHA prefill path of the model's forward_normal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed")

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods import mla_attention as kit  # noqa: E402

from attn_backend import paged_kv  # noqa: E402
from attn_backend.integrations.sglang import BACKEND_NAME, register  # noqa: E402

from .helpers import KitTestCase  # noqa: E402

register()
MLA_CASES = kit.make_mla_cases(BACKEND_NAME)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("rope", [0, 16], ids=["no_rope", "rope16"])
@pytest.mark.parametrize("layout", ["shuffled_pages", "interleaved_pages"])
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: c.name)
def test_kit_mla_cases_on_cpu(case, layout, rope):
    kit.run_mla_attention_case(KitTestCase(), case, device="cpu", dtype=torch.float32,
                               qk_rope_head_dim=rope, loc_layout=layout)


@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: c.name)
def test_kit_mla_cases_on_cpu_with_an_fp8_pool(case):
    """The kit's FP8 pool (float8_e4m3fn rows cast by the pool itself, no scale)."""
    kit.run_mla_attention_case(KitTestCase(), case, device="cpu", dtype=torch.bfloat16,
                               qk_rope_head_dim=16, fp8_kv_cache=True)


def test_kit_mla_cases_fail_on_a_wrong_value_row(monkeypatch):
    """The kit's comparison catches a backend that reads V from the wrong columns."""
    real = paged_kv.PagedKVCache.from_mla

    def shifted(buffer, rank, page_size, scale=None):
        cache = real(buffer, rank, page_size, scale=scale)
        return paged_kv.PagedKVCache(cache.k, cache.k[..., cache.k.shape[-1] - rank:])

    monkeypatch.setattr(paged_kv.PagedKVCache, "from_mla", staticmethod(shifted))
    with pytest.raises(AssertionError):
        kit.run_mla_attention_case(KitTestCase(), MLA_CASES[-1], device="cpu",
                                   dtype=torch.float32, qk_rope_head_dim=16)


def _mha_inputs(q_lens, kv_lens, heads=4, qk_dim=24, v_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, qk_dim, generator=gen)
    k = torch.randn(sum(kv_lens), heads, qk_dim, generator=gen)
    kv = torch.randn(sum(kv_lens), heads, 2 * v_dim, generator=gen)
    return q, k, kv[..., v_dim:]  # v strided, as SGLang's kv_b_proj split gives it


def _expected_mha(q, k, v, q_lens, kv_lens, scale):
    """Causal, the queries the last tokens of each sequence: plain softmax per request."""
    outs, lses, qi, ki = [], [], 0, 0
    for n, length in zip(q_lens, kv_lens):
        scores = torch.einsum("qhd,khd->hqk", q[qi:qi + n], k[ki:ki + length]) * scale
        q_pos = torch.arange(length - n, length)[:, None]
        scores = scores.masked_fill(torch.arange(length)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ki:ki + length]))
        lses.append(scores.logsumexp(-1).T)
        qi, ki = qi + n, ki + length
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("one_shot", [False, True], ids=["new_tokens", "one_shot"])
def test_mha_prefill_of_an_mla_model(one_shot):
    """forward_normal's MHA layer: K/V given in the call (no cache write), causal over the new
    tokens, or with mha_one_shot over each whole sequence; (out, lse) when asked."""
    fixture = kit.build_mla_attention_fixture(KitTestCase(), MLA_CASES[0], device="cpu",
                                              dtype=torch.float32, qk_rope_head_dim=8)
    backend = fixture.backend
    backend.init_forward_metadata(fixture.forward_batch)  # the forward the MHA layers run in
    heads, qk_dim, v_dim = MLA_CASES[0].num_heads, 24, 16
    layer = RadixAttention(num_heads=heads, head_dim=qk_dim, scaling=qk_dim ** -0.5,
                           num_kv_heads=heads, layer_id=0, v_head_dim=v_dim)
    q_lens = [3, 1, 5]
    kv_lens = [7, 1, 9] if one_shot else q_lens
    q, k, v = _mha_inputs(q_lens, kv_lens, heads, qk_dim, v_dim)
    batch = SimpleNamespace(extend_seq_lens_cpu=q_lens, seq_lens_cpu=torch.tensor(kv_lens),
                            mha_one_shot=one_shot, mha_return_lse=True,
                            attn_attend_prefix_cache=None)
    out, lse = backend.forward_extend(q.flatten(1), k, v, layer, batch, save_kv_cache=False)
    want_out, want_lse = _expected_mha(q, k, v, q_lens, kv_lens, qk_dim ** -0.5)
    torch.testing.assert_close(out.view(-1, heads, v_dim), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    batch.mha_return_lse = False
    only_out = backend.forward_extend(q.flatten(1), k, v, layer, batch, save_kv_cache=False)
    assert torch.equal(only_out, out)
    batch.seq_lens_cpu = torch.tensor([7, 1, 8])
    batch.mha_one_shot = True
    with pytest.raises(ValueError, match="K/V rows"):
        backend.forward_extend(q.flatten(1), k, v, layer, batch, save_kv_cache=False)


def test_mha_chunked_prefix_cache_of_an_mla_model():
    """MHA_CHUNKED_KV: the new tokens causal over themselves (with LSE), then each chunk of
    the cached prefixes (SGLang's prefix_chunk_len per request and chunk, some requests empty
    in later chunks) with all keys visible; merged by LSE they are causal attention over the
    whole sequences."""
    from attn_backend import reference

    fixture = kit.build_mla_attention_fixture(KitTestCase(), MLA_CASES[0], device="cpu",
                                              dtype=torch.float32, qk_rope_head_dim=8)
    backend = fixture.backend
    backend.init_forward_metadata(fixture.forward_batch)
    heads, qk_dim, v_dim = MLA_CASES[0].num_heads, 24, 16
    layer = RadixAttention(num_heads=heads, head_dim=qk_dim, scaling=qk_dim ** -0.5,
                           num_kv_heads=heads, layer_id=0, v_head_dim=v_dim)
    q_lens, prefix_lens, chunk_len = [3, 1, 5], [10, 0, 7], 4
    kv_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    q, k_all, v_all = _mha_inputs(q_lens, kv_lens, heads, qk_dim, v_dim, seed=3)
    starts = [0]
    for n in kv_lens:
        starts.append(starts[-1] + n)
    new_rows = torch.cat([torch.arange(starts[r] + p, starts[r + 1])
                          for r, p in enumerate(prefix_lens)])
    batch = SimpleNamespace(extend_seq_lens_cpu=q_lens, mha_one_shot=False, mha_return_lse=True,
                            attn_attend_prefix_cache=False)
    out, lse = backend.forward_extend(q.flatten(1), k_all[new_rows], v_all[new_rows], layer,
                                      batch, save_kv_cache=False)
    out = out.view(-1, heads, v_dim)
    num_chunks = -(-max(prefix_lens) // chunk_len)
    chunk_lens = torch.tensor([[max(0, min(p, (c + 1) * chunk_len) - c * chunk_len)
                                for p in prefix_lens] for c in range(num_chunks)])
    batch.attn_attend_prefix_cache, batch.prefix_chunk_seq_lens_cpu = True, chunk_lens
    for chunk in range(num_chunks):
        batch.prefix_chunk_idx = chunk
        first = chunk * chunk_len  # the chunk's K/V, request after request
        picked = torch.cat([torch.arange(starts[r] + first, starts[r] + first + n)
                            for r, n in enumerate(chunk_lens[chunk].tolist())])
        chunk_out, chunk_lse = backend.forward_extend(q.flatten(1), k_all[picked], v_all[picked],
                                                      layer, batch, save_kv_cache=False)
        merged = reference.merge_states(out, lse, chunk_out.view(-1, heads, v_dim), chunk_lse)
        out, lse = merged.out, merged.lse
    want_out, want_lse = _expected_mha(q, k_all, v_all, q_lens, kv_lens, qk_dim ** -0.5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_the_chunked_prefix_cache_finds_the_runners_translator():
    """SGLang builds each prefix chunk's K/V indices through `backend.kv_index_translator`
    (prepare_chunked_kv_indices reads its `reads_are_translated`): the MLA backend hands over
    the model runner's."""
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    config = kit.TinyMLAModelConfig(num_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
                                    hidden_size=64, context_len=64)
    runner = kit.MockMLAModelRunner(case=MLA_CASES[0], model_config=config, dtype=torch.float32,
                                    device="cpu", max_context_len=64, kv_lora_rank=32,
                                    qk_rope_head_dim=16)
    runner.kv_index_translator = translator = SimpleNamespace(reads_are_translated=False)
    assert SGLangAttnBackend(runner).kv_index_translator is translator


def test_mla_refusals_name_the_setting():
    case = MLA_CASES[0]
    config = kit.TinyMLAModelConfig(num_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
                                    hidden_size=64, context_len=64)
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    runner = kit.MockMLAModelRunner(case=case, model_config=config, dtype=torch.bfloat16,
                                    device="cpu", max_context_len=64, kv_lora_rank=32,
                                    qk_rope_head_dim=16)
    runner.device = "cuda"  # refused before any GPU work: the kernels take 512 + 64 only
    with pytest.raises(ValueError, match="MLA with kv_lora_rank 32 and rope 16 is not compiled"):
        SGLangAttnBackend(runner)
    runner.device = "cpu"

    class MLATokenToKVPoolFP4:  # SGLang's packed FP4 rows (scales beside the values)
        pass

    runner.token_to_kv_pool = type("PackedPool", (MLATokenToKVPoolFP4,), {})()
    with pytest.raises(ValueError, match="MLA pool PackedPool is not supported"):
        SGLangAttnBackend(runner)


def test_deepseek_models_ask_our_forward_method_handler(monkeypatch):
    """SGLang's DeepSeek attention asks AttentionBackendRegistry by backend name: ours makes
    SGLang's own choice for backends with every MHA form (we are on its one-shot and chunked
    prefix cache lists): prefills without a prefix, or with one past the threshold, take MHA
    (one-shot while the sequences fit a chunk, else chunked), the rest the absorbed MLA."""
    import copy

    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.models.deepseek_common import attention_backend_handler as handlers
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
        AttnForwardMethod)
    from sglang.srt.server_args import CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS

    assert BACKEND_NAME in handlers.MHA_ONE_SHOT_SUPPORTED_BACKENDS
    assert BACKEND_NAME in CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS
    handler = handlers.AttentionBackendRegistry.get_handler(BACKEND_NAME)
    assert handler is not handlers.handle_attention_triton
    fixture = kit.build_mla_attention_fixture(KitTestCase(), MLA_CASES[1], device="cpu",
                                              dtype=torch.float32)
    batch = fixture.forward_batch
    # What the chooser reads of DeepSeek's attention module (DeepseekV2AttentionMLA).
    attn = SimpleNamespace(qk_rope_head_dim=64, flashinfer_mla_disable_ragged=False,
                           chunked_prefix_cache_threshold=8192,
                           disable_chunked_prefix_cache=False)
    assert batch.forward_mode == ForwardMode.EXTEND and not any(batch.extend_prefix_lens_cpu)
    assert handler(attn, batch) == AttnForwardMethod.MHA_ONE_SHOT
    long_prefix = copy.copy(batch)
    long_prefix.extend_prefix_lens_cpu = [attn.chunked_prefix_cache_threshold] + \
        [0] * (len(batch.extend_prefix_lens_cpu) - 1)
    assert handler(attn, long_prefix) == AttnForwardMethod.MHA_ONE_SHOT
    monkeypatch.setattr(type(long_prefix), "get_max_chunk_capacity", lambda self: 1)
    assert handler(attn, long_prefix) == AttnForwardMethod.MHA_CHUNKED_KV
    short_prefix = copy.copy(long_prefix)
    short_prefix.extend_prefix_lens_cpu = [1] + long_prefix.extend_prefix_lens_cpu[1:]
    assert handler(attn, short_prefix) == AttnForwardMethod.MLA  # a short prefix hit
    decode = copy.copy(batch)
    decode.forward_mode = ForwardMode.DECODE
    assert handler(attn, decode) == AttnForwardMethod.MLA


@pytest.mark.gpu
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: c.name)
def test_kit_mla_cases_on_the_gpu(case):
    """The kit's cases at DeepSeek's latent width (512 + 64 rope) on the MLA kernel."""
    kit.run_mla_attention_case(KitTestCase(), case, device="cuda", dtype=torch.bfloat16,
                               kv_lora_rank=512, qk_rope_head_dim=64, hidden_size=256)


@pytest.mark.parametrize("case", [MLA_CASES[-1], MLA_CASES[6]], ids=lambda c: c.name)
def test_split_absorbed_inputs_match_the_concatenated_form(case):
    """SGLang hands backends on its absorb list q_nope (a strided bmm output) with q_rope, and
    k_nope with k_rope (written through set_mla_kv_buffer); the result and the pool rows are
    those of the concatenated call."""
    fixture = kit.build_mla_attention_fixture(KitTestCase(), case, device="cpu",
                                              dtype=torch.float32, qk_rope_head_dim=16)
    backend, batch = fixture.backend, fixture.forward_batch
    layer = fixture.actual_module.attn_mqa
    pool = backend.token_to_kv_pool
    backend.init_forward_metadata(batch)
    tokens, heads, rank, rope = batch.out_cache_loc.numel(), case.num_heads, 32, 16
    gen = torch.Generator().manual_seed(11)
    q_nope = torch.randn(heads, tokens, rank, generator=gen).transpose(0, 1)  # not contiguous
    q_rope = torch.randn(tokens, heads, rope, generator=gen)
    k_nope = torch.randn(tokens, 1, rank, generator=gen)
    k_rope = torch.randn(tokens, 1, rope, generator=gen)
    forward = backend.forward_decode if case.forward_mode.is_decode() else backend.forward_extend
    split = forward(q_nope, k_nope, k_nope, layer, batch, save_kv_cache=True, q_rope=q_rope,
                    k_rope=k_rope)
    rows_after_split = pool.get_key_buffer(0)[batch.out_cache_loc].clone()
    pool.get_key_buffer(0)[batch.out_cache_loc] = 0
    concatenated = forward(torch.cat([q_nope, q_rope], -1).flatten(1),
                           torch.cat([k_nope, k_rope], -1), k_nope, layer, batch,
                           save_kv_cache=True)
    torch.testing.assert_close(split, concatenated)
    assert torch.equal(pool.get_key_buffer(0)[batch.out_cache_loc], rows_after_split)
    assert torch.equal(rows_after_split, torch.cat([k_nope, k_rope], -1))


def _fp8_fixture(case, device, fmt, rank, rope):
    """The kit's fixture, its pool of format `fmt` (None: the model's dtype; the kit makes
    e4m3 pools, so another format is set on its runner and pool and the backend rebuilt, as
    SGLang builds it for that --kv-cache-dtype)."""
    fixture = kit.build_mla_attention_fixture(
        KitTestCase(), case, device=device, dtype=torch.bfloat16, fp8_kv_cache=fmt is not None,
        kv_lora_rank=rank, qk_rope_head_dim=rope, hidden_size=256 if rank == 512 else 64)
    if fmt is not None and fmt != fixture.runner.kv_cache_dtype:
        from attn_backend.integrations.sglang.backend import SGLangAttnBackend

        fixture.runner.kv_cache_dtype = fixture.runner.token_to_kv_pool.dtype = fmt
        fixture.backend = SGLangAttnBackend(fixture.runner)
    fixture.backend.init_forward_metadata(fixture.forward_batch)
    return fixture


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "concatenated"])
@pytest.mark.parametrize("case", [MLA_CASES[-1], MLA_CASES[6]], ids=lambda c: c.name)
def test_fp8_pool_with_a_layer_scale(case, split, fmt, device):
    """--kv-cache-dtype fp8_*: our write stores fp8(bf16(k / scale)) (SGLang's bytes: its
    backends divide, the pool casts) and leaves the model's k alone; the latent kernel reads
    the rows with the layer's scale, so it attends exactly as over a 16-bit pool holding the
    dequantised values."""
    rank, rope = (512, 64) if device == "cuda" else (32, 16)
    fp8_run = _fp8_fixture(case, device, fmt, rank, rope)
    plain = _fp8_fixture(case, device, None, rank, rope)
    fp8_pool = fp8_run.backend.token_to_kv_pool
    store = fp8_pool.kv_buffer[0].view(torch.uint8)
    scale = 0.5
    layer = fp8_run.actual_module.attn_mqa
    layer.k_scale, layer.k_scale_float = torch.tensor(scale, device=device), scale
    gen = torch.Generator().manual_seed(5)
    largest = torch.finfo(fmt).max

    def stored(x):  # SGLang's bytes for the values x
        return (x / scale).to(torch.bfloat16).float().clamp(-largest, largest).to(fmt)

    history = torch.randn(store.shape, generator=gen).to(device)
    store.copy_(stored(history).view(torch.uint8))
    plain.backend.token_to_kv_pool.kv_buffer[0].copy_(store.view(fmt).float() * scale)
    batch = fp8_run.forward_batch
    tokens, heads = batch.out_cache_loc.numel(), case.num_heads
    q = torch.randn(tokens, heads, rank + rope, generator=gen).to(torch.bfloat16).to(device)
    k = torch.randn(tokens, 1, rank + rope, generator=gen).to(torch.bfloat16).to(device)
    k_given = k.clone()
    k_held = (stored(k.float()).float() * scale).to(torch.bfloat16)

    def run(fixture, keys):
        forward = fixture.backend.forward_decode if case.forward_mode.is_decode() \
            else fixture.backend.forward_extend
        module_layer = fixture.actual_module.attn_mqa
        if split:
            return forward(q[..., :rank], keys[..., :rank], keys[..., :rank], module_layer,
                           fixture.forward_batch, save_kv_cache=True, q_rope=q[..., rank:],
                           k_rope=keys[..., rank:])
        return forward(q.flatten(1), keys, keys, module_layer, fixture.forward_batch,
                       save_kv_cache=True)

    got = run(fp8_run, k)
    want = run(plain, k_held)
    assert torch.equal(k, k_given)  # the model's tensor is not divided in place
    rows = store.view(-1, rank + rope)[batch.out_cache_loc.long()]
    assert torch.equal(rows, stored(k[:, 0].float()).view(torch.uint8))
    tol = 2e-2 if device == "cuda" else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: c.name)
def test_kit_mla_cases_on_the_gpu_with_an_fp8_pool(case):
    kit.run_mla_attention_case(KitTestCase(), case, device="cuda", dtype=torch.bfloat16,
                               kv_lora_rank=512, qk_rope_head_dim=64, hidden_size=256,
                               fp8_kv_cache=True)
