"""SGLang with an FP8 KV pool (CPU: the reference path; the FP8 kernels are issue 19): the
layer's scales reach the write and the read, the pool writes SGLang's own bytes, and the
model's K/V tensors are left as they were."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed")

from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from attn_backend import PagedKVCache, reference  # noqa: E402
from attn_backend.integrations.sglang.backend import SGLangAttnBackend  # noqa: E402

HEADS, KV_HEADS, DIM, PAGE = 4, 2, 64, 16


def _backend(dtype, pool_rows=4, slots=256):
    pool = MHATokenToKVPool(size=slots, page_size=PAGE, dtype=dtype, head_num=KV_HEADS,
                            head_dim=DIM, layer_num=1, device="cpu", enable_memory_saver=False,
                            enable_alt_stream=False)
    runner = SimpleNamespace(
        device="cpu", dtype=torch.bfloat16, kv_cache_dtype=dtype, page_size=PAGE,
        use_mla_backend=False, token_to_kv_pool=pool,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(pool_rows, 64,
                                                                   dtype=torch.int32)),
        model_config=SimpleNamespace(head_dim=DIM, v_head_dim=DIM, num_attention_heads=HEADS,
                                     num_key_value_heads=KV_HEADS))
    return SGLangAttnBackend(runner), pool


def _layer(k_scale, v_scale, k_scale_float=None, v_scale_float=None):
    return SimpleNamespace(
        layer_id=0, tp_q_head_num=HEADS, tp_k_head_num=KV_HEADS, qk_head_dim=DIM,
        head_dim=DIM, v_head_dim=DIM, scaling=DIM ** -0.5, logit_cap=0.0,
        is_cross_attention=False, attn_type=AttentionType.DECODER, sliding_window_size=-1,
        k_scale=k_scale, v_scale=v_scale, k_scale_float=k_scale_float,
        v_scale_float=v_scale_float)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scales", ["none", "parameters", "floats", "bare_float"])
def test_decode_over_an_fp8_pool(dtype, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    if scales == "none":  # a checkpoint without KV scales: plain cast, read at 1.0
        layer, k_scale, v_scale = _layer(None, None), None, None
    elif scales == "parameters":
        k_param = torch.nn.Parameter(torch.tensor(0.05), requires_grad=False)
        v_param = torch.nn.Parameter(torch.tensor(0.02), requires_grad=False)
        layer, k_scale, v_scale = _layer(k_param, v_param), 0.05, 0.02
    elif scales == "floats":  # what the quantisation methods set after loading
        layer = _layer(torch.nn.Parameter(torch.tensor(0.05), requires_grad=False),
                       torch.nn.Parameter(torch.tensor(0.02), requires_grad=False), 0.05, 0.02)
        k_scale, v_scale = 0.05, 0.02
    else:  # --quantization-param-path: bare floats on k_scale / v_scale only
        layer, k_scale, v_scale = _layer(0.04, 0.04), 0.04, 0.04
    backend, pool = _backend(dtype)
    lens, rows = [30, 17], [1, 3]
    req_to_token = backend.req_to_token_pool.req_to_token
    perm = torch.randperm(200, generator=gen) + 16  # slots of both requests, shuffled
    req_to_token[1, :30], req_to_token[3, :17] = perm[:30].int(), perm[30:47].int()
    history = torch.randn(47, KV_HEADS, DIM, generator=gen).bfloat16()
    pool.set_kv_buffer(layer, perm[:47].long(), history.clone(), history.clone(),
                       k_scale, v_scale)  # the earlier tokens, through SGLang's own store
    q = torch.randn(2, HEADS * DIM, generator=gen).bfloat16()
    k = torch.randn(2, KV_HEADS, DIM, generator=gen).bfloat16() * 0.2
    v = torch.randn(2, KV_HEADS, DIM, generator=gen).bfloat16() * 0.2
    k_before, v_before = k.clone(), v.clone()
    new_slots = torch.stack([req_to_token[1, 29], req_to_token[3, 16]]).long()
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens=torch.tensor(lens),
                            seq_lens_cpu=torch.tensor(lens), req_pool_indices=torch.tensor(rows),
                            out_cache_loc=new_slots, batch_size=2)
    backend.init_forward_metadata(batch)
    out = backend.forward_decode(q, k, v, layer, batch)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # never divided in place
    stored = pool.get_key_buffer(0)[new_slots].view(torch.uint8)
    sglang_bytes = (k.clone().div_(k_scale) if k_scale is not None else k).to(dtype)
    assert torch.equal(stored, sglang_bytes.view(torch.uint8))
    cache = PagedKVCache.from_sglang(pool.get_key_buffer(0), pool.get_value_buffer(0), PAGE,
                                     k_scale=k_scale, v_scale=v_scale)
    slots = torch.cat([req_to_token[1, :30], req_to_token[3, :17]]).long()
    want = reference.attention(q.view(2, HEADS, DIM), [0, 1, 2], cache, [0, 30, 47], slots,
                               sm_scale=DIM ** -0.5)
    torch.testing.assert_close(out.view(2, HEADS, DIM).float(), want.out, atol=1e-2, rtol=1e-2)
    if k_scale is not None:  # the scales matter: read at 1.0 the answer differs
        unscaled = PagedKVCache.from_sglang(pool.get_key_buffer(0), pool.get_value_buffer(0), PAGE)
        wrong = reference.attention(q.view(2, HEADS, DIM), [0, 1, 2], unscaled, [0, 30, 47],
                                    slots, sm_scale=DIM ** -0.5)
        assert not torch.allclose(wrong.out, want.out, atol=1e-2)
