"""attn_backend inside SGLang, with SGLang's own classes and attention test kit (CPU: reference)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="sglang is not installed")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods.dense_attention import (  # noqa: E402
    make_dense_cases,
    run_dense_attention_case,
)

from attn_backend.integrations.sglang import BACKEND_NAME, register  # noqa: E402

from .helpers import KitTestCase  # noqa: E402

register()
DENSE_CASES = make_dense_cases(BACKEND_NAME)
LAYOUTS = ("shuffled_pages", "interleaved_pages", "non_monotonic_extend")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c.name)
def test_kit_dense_cases_on_cpu(case, layout):
    if layout == "non_monotonic_extend" and case.forward_mode.is_decode():
        pytest.skip("the kit applies non_monotonic_extend to extend cases only")
    run_dense_attention_case(KitTestCase(), case, device="cpu", dtype=torch.float32,
                             loc_layout=layout)


def test_kit_covers_extend_and_decode():
    modes = {case.forward_mode for case in DENSE_CASES}
    assert {ForwardMode.EXTEND, ForwardMode.DECODE} <= modes and len(DENSE_CASES) == 12


def test_plugin_entry_point_registers_the_backend():
    entry_points = importlib.metadata.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in entry_points if ep.name == BACKEND_NAME]
    assert len(ours) == 1 and ours[0].value == "attn_backend.integrations.sglang:register"
    ours[0].load()()  # what SGLang's load_plugins() does, twice is harmless
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES
    assert BACKEND_NAME in ATTENTION_BACKENDS
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1


def test_launcher_registers_before_running_the_module(monkeypatch, tmp_path):
    import runpy
    import sys

    target = tmp_path / "fake_sglang_entry.py"
    target.write_text("import sys\nfrom sglang.srt.server_args import ATTENTION_BACKEND_CHOICES\n"
                      "assert 'attn_backend' in ATTENTION_BACKEND_CHOICES\n"
                      "RESULT = sys.argv[1:]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["attn_backend.launch", "fake_sglang_entry", "--x", "1"])
    namespace = runpy.run_module("attn_backend.launch", run_name="__main__")
    assert namespace is not None


# ---- what the kit's default run does not cover -----------------------------------------------

from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods.dense_attention import (  # noqa: E402
    DenseAttentionCase,
    make_swa_no_prefix_input_config_cases,
    make_swa_prefix_input_config_cases,
)


def _extra_cases():
    """Sliding windows with pages > 1 (extend and decode, GQA, window edges), mixed batches."""
    swa = make_swa_no_prefix_input_config_cases(BACKEND_NAME) + \
        make_swa_prefix_input_config_cases(BACKEND_NAME)
    return swa + (
        DenseAttentionCase(name="swa_decode_gqa_page16_window_edges", backend=BACKEND_NAME,
                           forward_mode=ForwardMode.DECODE, num_heads=8, num_kv_heads=2,
                           page_size=16, prefix_lens=(3, 4, 5, 17, 40), sliding_window_size=4),
        DenseAttentionCase(name="swa_extend_gqa_page32_prefix_across_pages", backend=BACKEND_NAME,
                           forward_mode=ForwardMode.EXTEND, num_heads=8, num_kv_heads=2,
                           page_size=32, prefix_lens=(40, 7), extend_lens=(3, 30),
                           sliding_window_size=8),
        DenseAttentionCase(name="mixed_prefill_and_decode_rows", backend=BACKEND_NAME,
                           forward_mode=ForwardMode.MIXED, num_heads=4, num_kv_heads=2,
                           page_size=16, prefix_lens=(0, 30, 17, 5), extend_lens=(20, 1, 1, 4)),
    )


EXTRA_CASES = _extra_cases()
DEVICES = [pytest.param("cpu", torch.float32, 16, 64, id="cpu"),
           pytest.param("cuda", torch.float16, 128, None, id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def _our_window_rule(monkeypatch):
    """Our decode window is SGLang's [p - w, p] (w + 1 keys): the kit's "extend window" rule."""
    monkeypatch.setattr(kit, "_SWA_DECODE_EXTEND_WINDOW",
                        kit._SWA_DECODE_EXTEND_WINDOW | {BACKEND_NAME})


@pytest.mark.parametrize("device, dtype, head_dim, hidden", DEVICES)
@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda c: c.name)
def test_windows_with_pages_and_mixed_batches(case, device, dtype, head_dim, hidden,
                                              _our_window_rule):
    hidden = hidden or case.num_heads * head_dim
    run_dense_attention_case(KitTestCase(), case, device=device, dtype=dtype, head_dim=head_dim,
                             hidden_size=hidden)


# ---- what the backend refuses, at construction or per batch --------------------------------

def _runner(device="cuda", **config):
    from types import SimpleNamespace

    base = dict(head_dim=128, v_head_dim=128, num_attention_heads=32, num_key_value_heads=8)
    base.update(config)
    return SimpleNamespace(
        device=device, dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, page_size=16,
        use_mla_backend=False, token_to_kv_pool=None,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(4, 64, dtype=torch.int32)),
        model_config=SimpleNamespace(**base))


@pytest.mark.parametrize("change, match", [
    (dict(kv_cache_dtype=torch.float32), r"kv cache dtype .* accepted: float16, bfloat16 .*, "
     r"float8_e4m3fn \(fp8_e4m3\), float8_e5m2"),
    (dict(head_dim=96, v_head_dim=96), r"head dims \(qk=96, v=96\) are not compiled"),
    (dict(num_attention_heads=512, num_key_value_heads=2), "group of 256; supported: 1..128"),
])
def test_backend_refuses_unsupported_models_at_construction(change, match):
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    runner = _runner()
    config_keys = {"head_dim", "v_head_dim", "num_attention_heads", "num_key_value_heads"}
    for name, value in change.items():
        setattr(runner.model_config if name in config_keys else runner, name, value)
    with pytest.raises(ValueError, match=match):
        SGLangAttnBackend(runner)
    SGLangAttnBackend(_runner())  # the supported configuration constructs (no GPU touched)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_extends_after_graph_setup_grow_their_wrapper(device):
    """With CUDA graphs on, extends still run eagerly (between the pieces of piecewise and
    breakable graphs too), so a later, larger extend must get a larger wrapper. (Seen in
    one_batch's correctness test: a 128-token extend, then one of 3664 tokens.)"""
    from types import SimpleNamespace

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runner = _runner(device=device)
    runner.req_to_token_pool = SimpleNamespace(
        req_to_token=torch.zeros(4, 20000, dtype=torch.int32, device=device))
    backend = SGLangAttnBackend(runner)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    (key,) = backend.layer_keys
    for tokens in (100, 16000):
        backend.init_forward_metadata_out_graph(SimpleNamespace(
            forward_mode=ForwardMode.EXTEND, seq_lens=torch.tensor([tokens]),
            seq_lens_cpu=torch.tensor([tokens]), extend_seq_lens_cpu=[tokens],
            req_pool_indices=torch.tensor([1], device=device), spec_info=None))
        prefill = backend.forward_metadata.wrappers[key]
        assert prefill.max_num_tokens >= tokens and not prefill.use_cuda_graph
        assert prefill._planned.num_tokens == tokens  # planned in the metadata call


def test_layer_shapes_are_collected_from_the_model_and_planned_once_per_forward():
    """The backend finds its layers' shapes (RadixAttention modules) when it is built, plans
    one wrapper per shape in init_forward_metadata, and a layer's forward only launches; a
    layer of a shape it never collected is refused, naming the shape."""
    from types import SimpleNamespace

    from sglang.srt.layers.radix_attention import RadixAttention

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend, WrapperKey

    model = torch.nn.Module()
    model.full = RadixAttention(num_heads=8, head_dim=16, scaling=0.25, num_kv_heads=2,
                                layer_id=0)
    model.window = RadixAttention(num_heads=8, head_dim=16, scaling=0.25, num_kv_heads=2,
                                  layer_id=1, sliding_window_size=5)
    model.same_shape = RadixAttention(num_heads=8, head_dim=16, scaling=0.25, num_kv_heads=2,
                                      layer_id=2)
    runner = _runner(device="cpu", head_dim=16, v_head_dim=16, num_attention_heads=8,
                     num_key_value_heads=2)
    runner.model = model
    backend = SGLangAttnBackend(runner)
    keys = {WrapperKey(8, 2, 16, 16, torch.bfloat16, torch.bfloat16, w, True) for w in (-1, 5)}
    assert backend.layer_keys == keys
    seq_lens = torch.tensor([7, 30])
    backend.init_forward_metadata_out_graph(SimpleNamespace(
        forward_mode=ForwardMode.DECODE, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
        req_pool_indices=torch.tensor([1, 2]), spec_info=None))
    wrappers = backend.forward_metadata.wrappers
    assert set(wrappers) == keys and all(w._planned is not None for w in wrappers.values())
    assert backend._wrapper(model.same_shape, torch.bfloat16) is \
        backend._wrapper(model.full, torch.bfloat16)
    stranger = RadixAttention(num_heads=4, head_dim=16, scaling=0.25, num_kv_heads=2, layer_id=3)
    with pytest.raises(RuntimeError, match="layer 3 has shape .* not among the layer shapes"):
        backend._wrapper(stranger, torch.bfloat16)


# ---- speculative target verification: the kit's verify runners (eager and CUDA graph) ---------

from sglang.test.kits.attention_unittest.runner_modes.speculative_target_verify_runner import (  # noqa: E402,E501
    run_dense_spec_verify_case,
    run_dense_spec_verify_cuda_graph_case,
)


def _verify_cases():
    """(case, topk): chains (topk 1, causal over the drafts) of several lengths and the kit's
    3-token trees (topk 2), over page sizes 1/16/32, MHA and GQA, a window, prefixes that end
    mid-page and at a page boundary."""
    def case(name, topk, drafts, **kwargs):
        args = dict(backend=BACKEND_NAME, forward_mode=ForwardMode.TARGET_VERIFY, num_heads=8,
                    num_kv_heads=2, page_size=16, prefix_lens=(5, 40, 16))
        args.update(kwargs)
        return pytest.param(DenseAttentionCase(name=name, extend_lens=(drafts,) *
                                               len(args["prefix_lens"]), **args), topk, id=name)
    return [
        case("verify_chain4_gqa_page16", 1, 4),
        case("verify_chain1_mha_page1", 1, 1, num_kv_heads=8, page_size=1),
        case("verify_chain7_gqa_page32", 1, 7, page_size=32, prefix_lens=(31, 50, 3, 32)),
        case("verify_tree3_gqa_page16", 2, 3),
        case("verify_tree3_mqa_page1", 2, 3, num_kv_heads=1, page_size=1, prefix_lens=(9, 2)),
        case("verify_tree3_gqa_page32_window", 2, 3, page_size=32, prefix_lens=(40, 57),
             sliding_window_size=8),
    ]


VERIFY_CASES = _verify_cases()


@pytest.mark.parametrize("device, dtype, head_dim, hidden", DEVICES)
@pytest.mark.parametrize("case, topk", VERIFY_CASES)
def test_kit_target_verify_eager(case, topk, device, dtype, head_dim, hidden, _our_window_rule):
    run_dense_spec_verify_case(KitTestCase(), case, topk=topk, device=device, dtype=dtype,
                               head_dim=head_dim, hidden_size=hidden or case.num_heads * head_dim)


@pytest.fixture
def _prefix_at_the_batch_slots(monkeypatch):
    """Work around a kit bug (sglang 0.5.17-0.5.23): the speculative CUDA-graph runner's
    `prepare_dense_runner_inputs` rewrites the prefix K/V at the default contiguous slots while
    the batch's req_to_token uses the shuffled-pages layout, so any backend that reads
    req_to_token sees other tokens' K/V. Write the prefix where req_to_token says it is."""
    from sglang.test.kits.attention_unittest.runner_modes import speculative_target_verify_runner

    def prepare_inputs(fixture, case, batch, inputs, *, max_context_len):
        table = fixture.runner.req_to_token_pool.req_to_token
        rows = batch.req_pool_indices.tolist()
        kit._populate_prefix_kv(fixture.actual_module, case, fixture.runner,
                                inputs["prefix_hidden"], max_context_len=max_context_len,
                                loc_fn=lambda r, pos: int(table[rows[r], pos]))

    monkeypatch.setattr(speculative_target_verify_runner, "prepare_dense_runner_inputs",
                        prepare_inputs)


@pytest.mark.parametrize("device, dtype, head_dim, hidden", DEVICES)
@pytest.mark.parametrize("case, topk", VERIFY_CASES)
def test_kit_target_verify_cuda_graph(case, topk, device, dtype, head_dim, hidden,
                                      _our_window_rule, _prefix_at_the_batch_slots):
    """Capture at batch 4, replay with the case's (smaller) batch and padded rows."""
    run_dense_spec_verify_cuda_graph_case(KitTestCase(), case, topk=topk, device=device,
                                          dtype=dtype, head_dim=head_dim,
                                          hidden_size=hidden or case.num_heads * head_dim)


@pytest.mark.parametrize("case", [c for c in DENSE_CASES if c.name in (
    "mha_extend_ragged_page_boundary", "gqa_decode_page_boundary")], ids=lambda c: c.name)
def test_save_kv_cache_false_leaves_the_pool_to_the_model(case):
    """Fused rope+store models write K/V themselves and pass save_kv_cache=False: the backend
    must not write (here it is handed garbage K/V, which would corrupt the pool)."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    fixture = kit.build_dense_attention_fixture(KitTestCase(), case, head_dim=16, hidden_size=64,
                                                dtype=torch.float32, device="cpu")
    module, batch = fixture.actual_module, fixture.forward_batch
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=fixture.backend)):
        fixture.backend.init_forward_metadata(batch)
        q, k, v = module.project_qkv(fixture.input_hidden)
        layer = module.attn
        fixture.runner.token_to_kv_pool.set_kv_buffer(  # the model's own store
            layer, batch.out_cache_loc, k.view(-1, layer.tp_k_head_num, layer.head_dim),
            v.view(-1, layer.tp_v_head_num, layer.v_head_dim))
        out = layer(q, torch.randn_like(k) * 100, torch.randn_like(v) * 100, batch,
                    save_kv_cache=False)
        actual = module.o_proj(out)
    torch.testing.assert_close(actual, kit.expected_dense_fixture_output(fixture),
                               atol=kit.DENSE_ATOL, rtol=kit.DENSE_RTOL)


# ---- the draft model's extend (DRAFT_EXTEND_V2): the kit's dense and draft-extend graph runners --

from sglang.test.kits.attention_unittest.runner_modes.speculative_draft_extend_runner import (  # noqa: E402,E501
    run_dense_draft_extend_v2_cuda_graph_case,
)


def _draft_extend_cases():
    """Accepted-token extends over prefixes ending mid-page and at a page boundary, pages
    1/16/32, MHA/GQA/MQA, a window; the graph runner needs one width for every request."""
    def case(name, extend, **kwargs):
        args = dict(backend=BACKEND_NAME, forward_mode=ForwardMode.DRAFT_EXTEND_V2, num_heads=8,
                    num_kv_heads=2, page_size=16, prefix_lens=(5, 40, 16))
        args.update(kwargs)
        return DenseAttentionCase(name=name, extend_lens=(extend,) * len(args["prefix_lens"]),
                                  **args)
    return (
        case("draft_extend4_gqa_page16", 4),
        case("draft_extend1_mha_page1", 1, num_kv_heads=8, page_size=1),
        case("draft_extend3_mqa_page32", 3, num_kv_heads=1, page_size=32,
             prefix_lens=(31, 50, 3, 32)),
        case("draft_extend4_gqa_page16_window", 4, sliding_window_size=8, prefix_lens=(40, 57)),
    )


DRAFT_EXTEND_CASES = _draft_extend_cases()


@pytest.mark.parametrize("device, dtype, head_dim, hidden", DEVICES)
@pytest.mark.parametrize("case", DRAFT_EXTEND_CASES + (
    DenseAttentionCase(name="draft_extend_ragged_eager", backend=BACKEND_NAME,
                       forward_mode=ForwardMode.DRAFT_EXTEND_V2, num_heads=8, num_kv_heads=2,
                       page_size=16, prefix_lens=(5, 40, 16), extend_lens=(1, 4, 2)),),
    ids=lambda c: c.name)
def test_kit_draft_extend_eager(case, device, dtype, head_dim, hidden, _our_window_rule):
    run_dense_attention_case(KitTestCase(), case, device=device, dtype=dtype, head_dim=head_dim,
                             hidden_size=hidden or case.num_heads * head_dim)


@pytest.fixture
def _draft_extend_prefix_at_the_batch_slots(monkeypatch, _prefix_at_the_batch_slots):
    """The draft-extend graph runner has the verify runner's prefix-placement bug too."""
    from sglang.test.kits.attention_unittest.runner_modes import (
        speculative_draft_extend_runner,
        speculative_target_verify_runner,
    )

    monkeypatch.setattr(speculative_draft_extend_runner, "prepare_dense_runner_inputs",
                        speculative_target_verify_runner.prepare_dense_runner_inputs)


@pytest.mark.parametrize("device, dtype, head_dim, hidden", DEVICES)
@pytest.mark.parametrize("case", DRAFT_EXTEND_CASES, ids=lambda c: c.name)
def test_kit_draft_extend_cuda_graph(case, device, dtype, head_dim, hidden, _our_window_rule,
                                     _draft_extend_prefix_at_the_batch_slots):
    """Capture at batch 4, replay with the case's batch and padded rows (fill-value lengths)."""
    run_dense_draft_extend_v2_cuda_graph_case(KitTestCase(), case, device=device, dtype=dtype,
                                              head_dim=head_dim,
                                              hidden_size=hidden or case.num_heads * head_dim)


def test_draft_extend_graph_replay_lengths():
    """At a draft-extend graph replay SGLang hands a view without extend lengths: every request
    has the captured width of query rows, spec_info keeps the real extends, padded rows carry
    the fill value. Query i sits at (seq_len - extend) + i, as in SGLang's triton backend."""
    from types import SimpleNamespace

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    backend = SGLangAttnBackend(_runner(device="cpu"))
    fill = backend.get_cuda_graph_seq_len_fill_value()
    view = SimpleNamespace(
        forward_mode=ForwardMode.DRAFT_EXTEND_V2, batch_size=4,
        seq_lens=torch.tensor([44, 20, fill, fill]), seq_lens_cpu=torch.tensor([44, 20, fill, fill]),
        req_pool_indices=torch.tensor([1, 2, 0, 0]),
        spec_info=SimpleNamespace(num_tokens_per_req=4, extend_seq_lens_cpu=[2, 4, 4, 4]))
    backend.init_forward_metadata_out_graph(view)
    meta = backend.forward_metadata
    assert meta.qo_indptr.tolist() == [0, 4, 8, 12, 16]
    # 42 + 4 keys for the first (its 4 rows start at 44 - 2), 20 for the second; the padded
    # rows read their own 4 rows' worth of pool row 0, never an empty or negative range.
    assert meta.kv_lens.tolist() == [46, 20, 4, 4]
    assert set(meta.wrappers) == backend.layer_keys


# ---- hybrid sliding-window pools (SWAKVPool): window layers behind a full-to-SWA slot map ------

def _hybrid_pool_pair(device, dtype, page_size, num_slots, head_num, head_dim, gen):
    """A plain pool and an SWAKVPool (layer 0 windowed, layer 1 full) with a random full-to-SWA
    slot map (each full slot its own SWA slot, in shuffled order; slot 0 stays the padding
    slot), as SGLang's SWA allocator keeps it."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    plain = MHATokenToKVPool(size=num_slots, page_size=page_size, dtype=dtype, head_num=head_num,
                             head_dim=head_dim, layer_num=2, device=device,
                             enable_memory_saver=False)
    hybrid = SWAKVPool(size=num_slots, size_swa=2 * num_slots, page_size=page_size, dtype=dtype,
                       head_num=head_num, head_dim=head_dim, swa_attention_layer_ids=[0],
                       full_attention_layer_ids=[1], device=device)
    mapping = torch.zeros(num_slots + page_size + 1, dtype=torch.int64)
    mapping[-1] = -1
    mapping[page_size:num_slots] = torch.randperm(2 * num_slots - page_size,
                                                  generator=gen)[: num_slots - page_size] + page_size
    hybrid.register_mapping(mapping.to(device))
    return plain, hybrid


def _hybrid_runner(device, dtype, page_size, pool, req_to_token, head_num, head_dim, window):
    from types import SimpleNamespace

    return SimpleNamespace(
        device=device, dtype=dtype, kv_cache_dtype=dtype, page_size=page_size,
        use_mla_backend=False, token_to_kv_pool=pool,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        model_config=SimpleNamespace(head_dim=head_dim, v_head_dim=head_dim,
                                     num_attention_heads=2 * head_num,
                                     num_key_value_heads=head_num, sliding_window_size=window))


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("device, dtype, head_dim", [
    pytest.param("cpu", torch.float32, 16, id="cpu"),
    pytest.param("cuda", torch.bfloat16, 128, id="cuda", marks=pytest.mark.gpu)])
def test_hybrid_swa_pool_matches_one_pool(page_size, device, dtype, head_dim):
    """Extend then decode through a hybrid pool gives what one plain pool gives, for the
    window layer and the full layer: K/V written at the mapped SWA slots, read back through
    the map (a missing translation on either side reads other tokens' K/V)."""
    from types import SimpleNamespace

    from sglang.srt.layers.radix_attention import AttentionType

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(page_size)
    head_num, window = 2, 9
    prompt_lens, num_slots = [37, 5, 20], 512
    plain, hybrid = _hybrid_pool_pair(device, dtype, page_size, num_slots, head_num, head_dim, gen)
    # Requests on shuffled pages (rows 1..3 of the pool table; row 0 is SGLang's padding row).
    req_to_token = torch.zeros(4, 64, dtype=torch.int32)
    pages = (torch.randperm(num_slots // page_size - 1, generator=gen) + 1).tolist()
    for row, length in enumerate(prompt_lens, start=1):
        for t in range(length + 1):  # the prompt and one decoded token
            if t % page_size == 0:
                page = pages.pop()
            req_to_token[row, t] = page * page_size + t % page_size
    req_to_token = req_to_token.to(device)
    backends = {name: SGLangAttnBackend(_hybrid_runner(device, dtype, page_size, pool,
                                                       req_to_token, head_num, head_dim, window))
                for name, pool in (("plain", plain), ("hybrid", hybrid))}
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=2 * head_num, tp_k_head_num=head_num,
                              tp_v_head_num=head_num, qk_head_dim=head_dim, head_dim=head_dim,
                              v_head_dim=head_dim, scaling=head_dim ** -0.5, logit_cap=0.0,
                              sliding_window_size=window if i == 0 else -1,
                              is_cross_attention=False, attn_type=AttentionType.DECODER)
              for i in range(2)]
    rows = torch.arange(1, len(prompt_lens) + 1, device=device)

    def batch(mode, seq_lens, new_lens):
        starts = [s - n for s, n in zip(seq_lens, new_lens)]
        loc = torch.cat([req_to_token[r, s:s + n].long()
                         for r, s, n in zip(rows.tolist(), starts, new_lens)])
        return SimpleNamespace(forward_mode=mode, seq_lens=torch.tensor(seq_lens, device=device),
                               seq_lens_cpu=torch.tensor(seq_lens), req_pool_indices=rows,
                               out_cache_loc=loc, extend_seq_lens_cpu=list(new_lens),
                               extend_prefix_lens_cpu=starts, spec_info=None)

    steps = [(ForwardMode.EXTEND, prompt_lens, prompt_lens),
             (ForwardMode.DECODE, [n + 1 for n in prompt_lens], [1] * len(prompt_lens))]
    for mode, seq_lens, new_lens in steps:
        forward_batch = batch(mode, seq_lens, new_lens)
        tokens = sum(new_lens)
        for layer in layers:
            q = torch.randn(tokens, 2 * head_num * head_dim, generator=gen).to(device, dtype)
            k = torch.randn(tokens, head_num, head_dim, generator=gen).to(device, dtype)
            v = torch.randn(tokens, head_num, head_dim, generator=gen).to(device, dtype)
            outs = {}
            for name, backend in backends.items():
                backend.init_forward_metadata(forward_batch)
                run = backend.forward_decode if mode.is_decode() else backend.forward_extend
                outs[name] = run(q, k, v, layer, forward_batch)
            torch.testing.assert_close(outs["hybrid"], outs["plain"], atol=0, rtol=0)
        # The window layer's K/V are in the SWA sub-pool at the mapped slots.
        loc = forward_batch.out_cache_loc
        swa_loc = hybrid.full_to_swa_index_mapping[loc]
        torch.testing.assert_close(hybrid.swa_kv_pool.get_key_buffer(0)[swa_loc],
                                   plain.get_key_buffer(0)[loc], atol=0, rtol=0)
        assert hybrid.swa_kv_pool.get_key_buffer(0)[loc].ne(
            plain.get_key_buffer(0)[loc]).any()  # the map is not the identity here


def test_backend_refuses_other_hybrid_pools_at_construction():
    """Hybrid pools other than SWAKVPool over MHA sub-pools address window layers another way:
    refused at construction, naming the pool and what is supported."""
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    class OtherHybridPool(SWAKVPool):
        pass

    runner = _runner(device="cpu")
    runner.token_to_kv_pool = OtherHybridPool(
        size=64, size_swa=32, page_size=1, dtype=torch.float32, head_num=2, head_dim=16,
        swa_attention_layer_ids=[0], full_attention_layer_ids=[1], device="cpu")
    with pytest.raises(ValueError, match="hybrid KV pool OtherHybridPool is not supported"):
        SGLangAttnBackend(runner)
