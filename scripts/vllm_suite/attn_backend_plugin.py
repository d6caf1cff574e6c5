"""pytest plugin: vLLM's own attention-backend test modules, run as they are against attn_backend.

    python -m pytest -p attn_backend_plugin DIR/tests/v1/attention/test_attention_backends.py
    (scripts/vllm_suite/run.sh sets the paths and picks the suites)

vLLM's modules (fetched unchanged by fetch_tests.sh) are adapted from outside, here:
- each module's backend lists (`BACKENDS_TO_TEST`, `SLIDING_WINDOW_BACKENDS_TO_TEST`) become `[CUSTOM]` after collection (our plugin's
  `register()` fills vLLM's static CUSTOM member; for MLA models it resolves to our MLA class),
  and the correctness helper runs only ours where a test adds backends of its own; the skip
  conditions the modules evaluated at import (e.g. FlashInfer not installed) stand;
- the fixtures those modules take from vLLM's root conftest (`default_vllm_config`,
  `dist_init`, `workspace_init`) are defined here, as that conftest does, without its imports;
- the Hugging Face ids the suites name resolve to local config.json files (a hub cache written
  here, `HF_HUB_OFFLINE=1`): the machine has no network, and the suites only read the
  attention geometry. The geometry of each stand-in is in LOCAL_CONFIGS;
- without a GPU the modules' `DEVICE_TYPE` becomes "cpu", so the runner itself can be checked
  on a CPU machine (attn_backend then runs its float reference);
- with ATTN_BACKEND_VLLM_SUITE_GRAPHS=1 (on a GPU) the correctness helper runs our backend as
  its CUDA-graph variant does for FlashInfer: `use_cuda_graph=True`, i.e. the forward once
  eagerly, then captured in a CUDA graph and replayed, the replay's output checked. vLLM's
  suites pass that flag only in FlashInfer's own tests; run.sh runs every suite both ways.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Each hub id's stand-in: the attention geometry the suites read (heads, kv heads, head dim,
# window, MLA dims). Values are the published models' where they matter to attention.
LOCAL_CONFIGS = {
    "Qwen/Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936, tie_word_embeddings=True,
        torch_dtype="bfloat16"),
    # The sliding-window suite's model: a short window, so its batches cross it.
    "microsoft/Phi-tiny-MoE-instruct": dict(
        architectures=["PhiMoEForCausalLM"], model_type="phimoe", hidden_size=4096,
        intermediate_size=448, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=4096,
        sliding_window=128, num_local_experts=16, num_experts_per_tok=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, vocab_size=32064, torch_dtype="bfloat16"),
    "deepseek-ai/DeepSeek-R1": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
        topk_group=4, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        vocab_size=129280, torch_dtype="bfloat16"),
}
_SNAPSHOT = "0" * 40


def write_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding each LOCAL_CONFIGS id at one snapshot."""
    for repo, config in LOCAL_CONFIGS.items():
        base = root / f"models--{repo.replace('/', '--')}"
        snapshot = base / "snapshots" / _SNAPSHOT
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps(config, indent=1))
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(_SNAPSHOT)
    return root


def pytest_configure(config):
    cache = Path(os.environ.get("ATTN_BACKEND_VLLM_HUB_CACHE",
                                Path(tempfile.gettempdir()) / "attn_backend_vllm_hub"))
    os.environ["HF_HUB_CACHE"] = str(write_hub_cache(cache))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from attn_backend.integrations import vllm as integration

    integration.register()


def pytest_collection_modifyitems(session, config, items):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    ours = AttentionBackendEnum.CUSTOM
    for module in {item.module for item in items if getattr(item, "module", None)}:
        for name, value in vars(module).items():  # BACKENDS_TO_TEST, SLIDING_WINDOW_...
            if name.endswith("BACKENDS_TO_TEST") and isinstance(value, list):
                value[:] = [ours]
        run = getattr(module, "_test_backend_correctness", None)
        if run is not None and not getattr(run, "ours_only", False):
            module._test_backend_correctness = _ours_only(run, ours)
        if hasattr(module, "DEVICE_TYPE") and not torch.cuda.is_available():
            module.DEVICE_TYPE = "cpu"


def graphs_requested() -> bool:
    return os.environ.get("ATTN_BACKEND_VLLM_SUITE_GRAPHS", "0") == "1"


def _ours_only(run, ours):
    """The suites' correctness helper, for our backend only: some tests also pass it backends
    of their own choosing (e.g. FlexAttention at block 128), which are vLLM's, not ours."""

    def run_ours(batch_spec, model, backends, *args, **kwargs):
        if ours not in backends:
            return None
        if graphs_requested():
            if not torch.cuda.is_available():
                pytest.skip("ATTN_BACKEND_VLLM_SUITE_GRAPHS=1 needs a GPU")
            kwargs["use_cuda_graph"] = True
        return run(batch_spec, model, [ours], *args, **kwargs)

    run_ours.ours_only = True
    return run_ours


@pytest.fixture()
def default_vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    with set_current_vllm_config(config):
        yield config


@pytest.fixture()
def dist_init():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    fd, store = tempfile.mkstemp()
    os.close(fd)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend=backend,
                                     distributed_init_method=f"file://{store}")
        initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()
        os.unlink(store)


@pytest.fixture()
def workspace_init():
    from vllm.v1.worker.workspace import init_workspace_manager, reset_workspace_manager

    if torch.cuda.is_available():
        init_workspace_manager(torch.device(0))
    yield
    reset_workspace_manager()
