"""The plugin in every process of a tensor-parallel SGLang (issue 23's CPU part).

SGLang's engine sets the spawn start method and starts one scheduler process per TP rank
(`run_scheduler_process`), which calls `load_plugins()` first. These tests start two such
processes (spawn, and fork for launchers that keep the default) and check in each that the
plugin made `attn_backend` an attention backend and a CLI choice, with the rank's share of the
heads from SGLang's own model config.
"""

from __future__ import annotations

import os

import pytest

from .helpers import run_in_processes

pytest.importorskip("sglang", reason="sglang is not installed")

MODELS = {  # name: (config kwargs, tp size, heads per rank: query, kv)
    "llama70b_tp2": (dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                          head_dim=128), 2, (32, 4)),
    "llama8b_tp2": (dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128), 2, (16, 4)),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import LlamaConfig

    dirs = {}
    for name, (kwargs, _, _) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        LlamaConfig(num_hidden_layers=1, intermediate_size=256, vocab_size=512,
                    max_position_embeddings=4096, torch_dtype="bfloat16",
                    architectures=["LlamaForCausalLM"], **kwargs).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _scheduler(rank: int, model_dir: str, tp_size: int, results) -> None:
    """What each SGLang scheduler process does first, then what its model runner reads."""
    try:
        from sglang.srt.plugins import load_plugins

        load_plugins()
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

        from attn_backend.integrations.sglang import BACKEND_NAME

        model = ModelConfig(model_path=model_dir)
        results.put((rank, BACKEND_NAME in ATTENTION_BACKENDS,
                     BACKEND_NAME in ATTENTION_BACKEND_CHOICES,
                     model.get_num_attention_heads(tp_size), model.get_num_kv_heads(tp_size),
                     os.getpid()))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(error).__name__}: {error}", None, None, None, os.getpid()))


@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("model", list(MODELS))
def test_attn_backend_is_registered_in_every_scheduler(model_dirs, method, model):
    _, tp_size, want_heads = MODELS[model]
    got = run_in_processes(method, _scheduler,
                           [(rank, model_dirs[model], tp_size) for rank in range(tp_size)])
    assert len({pid for *_, pid in got}) == tp_size and os.getpid() not in {p for *_, p in got}
    for rank, (got_rank, registered, choice, heads, kv_heads, _) in enumerate(got):
        assert (got_rank, registered, choice, (heads, kv_heads)) == \
            (rank, True, True, want_heads), got
