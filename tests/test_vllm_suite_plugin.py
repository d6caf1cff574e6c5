"""The adaptation of vLLM's own attention-backend tests (scripts/vllm_suite): the hub ids they
name resolve offline to the local configs, and their correctness helper runs our backend only."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed")

PLUGIN = Path(__file__).resolve().parents[1] / "scripts" / "vllm_suite" / "attn_backend_plugin.py"


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("attn_backend_plugin", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_ids_resolve_offline_to_the_local_configs(plugin, tmp_path, monkeypatch):
    from vllm.config import ModelConfig

    monkeypatch.setenv("HF_HUB_CACHE", str(plugin.write_hub_cache(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", os.environ["HF_HUB_CACHE"])
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    qwen = ModelConfig(model="Qwen/Qwen3-0.6B", max_model_len=64, skip_tokenizer_init=True)
    assert (qwen.hf_text_config.num_attention_heads, qwen.get_total_num_kv_heads(),
            qwen.get_head_size()) == (16, 8, 128)
    phi = ModelConfig(model="microsoft/Phi-tiny-MoE-instruct", max_model_len=512,
                      skip_tokenizer_init=True)
    assert phi.get_sliding_window() == 128  # shorter than the suite's longer batches
    deepseek = ModelConfig(model="deepseek-ai/DeepSeek-R1", max_model_len=64,
                           skip_tokenizer_init=True)
    assert deepseek.use_mla and deepseek.get_head_size() == 576


def test_the_correctness_helper_runs_our_backend_only(plugin):
    calls = []

    def helper(batch_spec, model, backends, *args, **kwargs):
        calls.append(list(backends))

    ours = object()
    wrapped = plugin._ours_only(helper, ours)
    wrapped("spec", "model", [ours, "FLEX_ATTENTION"], block_size=16)
    wrapped("spec", "model", ["FLEX_ATTENTION"], block_size=128)  # a peer-only call: skipped
    assert calls == [[ours]]


def test_the_graph_mode_asks_the_helper_for_a_captured_forward(plugin, monkeypatch):
    seen = []

    def helper(batch_spec, model, backends, *args, **kwargs):
        seen.append(kwargs.get("use_cuda_graph", False))

    ours = object()
    wrapped = plugin._ours_only(helper, ours)
    monkeypatch.setenv("ATTN_BACKEND_VLLM_SUITE_GRAPHS", "0")
    wrapped("spec", "model", [ours])
    monkeypatch.setenv("ATTN_BACKEND_VLLM_SUITE_GRAPHS", "1")
    monkeypatch.setattr(plugin.torch.cuda, "is_available", lambda: True)
    wrapped("spec", "model", [ours], use_cuda_graph=False)
    assert seen == [False, True]
    monkeypatch.setattr(plugin.torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        wrapped("spec", "model", [ours])
