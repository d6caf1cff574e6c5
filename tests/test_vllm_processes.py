"""The plugin in every process of a tensor-parallel vLLM (issue 23's CPU part).

vLLM starts each TP worker as its own process (forked, or spawned where CUDA is already
initialised in the parent or VLLM_WORKER_MULTIPROC_METHOD=spawn), hands it the pickled
VllmConfig, and loads the general plugins there. These tests start two workers both ways, as
vLLM's WorkerWrapperBase.init_worker does (unpickle the config, load_general_plugins, build
the model inside set_current_vllm_config), and check in each that `CUSTOM` resolves to our
class for the model's kind with the rank's share of the heads. vLLM's real CUDA selector picks
the class for both kinds, and the names added at registration are shown to need forking.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
vllm = pytest.importorskip("vllm", reason="vllm is not installed")

from vllm.config import (DeviceConfig, ModelConfig, ParallelConfig,  # noqa: E402
                         VllmConfig, set_current_vllm_config)
from vllm.config.attention import AttentionConfig  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from attn_backend.integrations import vllm as integration  # noqa: E402

from .helpers import run_in_processes  # noqa: E402

START_METHODS = ["fork", "spawn"]
# (name, config class, kwargs, heads per rank at TP 2: query, kv)
MODELS = {
    "llama70b": ("LlamaConfig", dict(hidden_size=8192, num_attention_heads=64,
                                     num_key_value_heads=8, head_dim=128), (32, 4)),
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=7168, num_attention_heads=128,
                                             num_key_value_heads=128, kv_lora_rank=512,
                                             q_lora_rank=1536, qk_nope_head_dim=128,
                                             qk_rope_head_dim=64, v_head_dim=128,
                                             n_routed_experts=8, moe_intermediate_size=64,
                                             first_k_dense_replace=1), (64, 1)),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import transformers

    dirs = {}
    for name, (cls, kwargs, _) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        getattr(transformers, cls)(num_hidden_layers=1, intermediate_size=256, vocab_size=512,
                                   max_position_embeddings=4096, torch_dtype="bfloat16",
                                   **kwargs).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _config(model_dir: str, tensor_parallel_size: int, backend: str) -> VllmConfig:
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=4096)
    # The model config's per-rank queries read the parallel config only; ranks are processes.
    parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                              distributed_executor_backend="mp")
    return VllmConfig(model_config=model, parallel_config=parallel,
                      device_config=DeviceConfig(device="cpu"),
                      attention_config=AttentionConfig(backend=backend))


def _worker(rank: int, config_bytes: bytes, results) -> None:
    """What each vLLM worker does before building its model, then what its layers ask."""
    try:
        vllm_config = pickle.loads(config_bytes)  # before any plugin is loaded, as in vLLM
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        with set_current_vllm_config(vllm_config):
            backend = vllm_config.attention_config.backend
            cls = backend.get_class()  # what a layer's selection resolves
            model, parallel = vllm_config.model_config, vllm_config.parallel_config
            heads = model.get_num_attention_heads(parallel)
            kv_heads = 1 if model.use_mla else model.get_num_kv_heads(parallel)
        results.put((rank, f"{cls.__module__}.{cls.__qualname__}", cls.is_mla(), heads,
                     kv_heads, os.getpid()))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(error).__name__}: {error}", None, None, None, os.getpid()))


def _start_workers(method: str, config: VllmConfig, num_workers: int = 2):
    config_bytes = pickle.dumps(config)  # as vLLM hands each worker its config
    return run_in_processes(method, _worker, [(rank, config_bytes) for rank in range(num_workers)])


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("model", list(MODELS))
def test_custom_is_our_backend_in_every_worker(model_dirs, method, model):
    integration.register()  # the front end's registration; the workers do their own
    config = _config(model_dirs[model], 2, "CUSTOM")
    want_heads = MODELS[model][2]
    got = _start_workers(method, config)
    assert len({pid for *_, pid in got}) == 2 and os.getpid() not in {pid for *_, pid in got}
    mla = model == "deepseek_v3"
    want_class = "attn_backend.integrations.vllm.mla.AttnBackendMLAAsCustom" if mla else \
        "attn_backend.integrations.vllm.backend.AttnBackendAsCustom"
    for rank, (got_rank, cls, is_mla, heads, kv_heads, _) in enumerate(got):
        assert (got_rank, cls, is_mla, (heads, kv_heads)) == (rank, want_class, mla, want_heads)


@pytest.mark.parametrize("method", START_METHODS)
def test_names_added_at_registration_need_forked_workers(model_dirs, method):
    """`ATTN_BACKEND` is an enum member made by register(); a spawned worker unpickles the
    config before its plugins run, so the member is not there yet (vLLM 0.33). Hence CUSTOM."""
    integration.register()
    config = _config(model_dirs["llama70b"], 2, integration.BACKEND_NAME)
    got = _start_workers(method, config)
    if method == "fork":
        assert all(cls == "attn_backend.integrations.vllm.backend.AttnBackend"
                   for _, cls, *_ in got), got
    else:
        assert all("is not a valid AttentionBackendEnum" in cls for _, cls, *_ in got), got


@pytest.mark.parametrize("model, tp, want", [("llama70b", 2, (32, 4)), ("llama70b", 4, (16, 2)),
                                             ("llama70b", 8, (8, 1)),
                                             ("deepseek_v3", 8, (16, 1))])
def test_per_rank_heads_are_served(model_dirs, model, tp, want):
    """Each rank's share of the heads is a shape the kernels take (the MLA latent kernel:
    1..128 heads over one latent row; MHA: GQA groups of 1..MAX_GROUP_SIZE)."""
    from attn_backend._validation import MAX_GROUP_SIZE

    config = _config(model_dirs[model], tp, "CUSTOM")
    model_config, parallel = config.model_config, config.parallel_config
    heads = model_config.get_num_attention_heads(parallel)
    kv_heads = 1 if model_config.use_mla else model_config.get_num_kv_heads(parallel)
    assert (heads, kv_heads) == want
    assert heads % kv_heads == 0 and 1 <= heads // kv_heads <= MAX_GROUP_SIZE


def _selector_config(mla: bool):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=576 if mla else 128, dtype=torch.bfloat16,
                                   kv_cache_dtype="auto", block_size=None, use_mla=mla)


def _class_path(mla: bool) -> str:
    return ("attn_backend.integrations.vllm.mla.AttnBackendMLAAsCustom" if mla else
            "attn_backend.integrations.vllm.backend.AttnBackendAsCustom")


@pytest.mark.parametrize("model", list(MODELS))
def test_custom_validates_for_each_kind(model_dirs, model):
    """What vLLM's platform does with a chosen backend (platforms/cuda.py): resolve the
    member's class, run its validate_configuration for the layer, return its full_cls_name."""
    integration.register()
    mla = model == "deepseek_v3"
    with set_current_vllm_config(_config(model_dirs[model], 1, "CUSTOM")):
        cls = AttentionBackendEnum.CUSTOM.get_class()
        reasons = cls.validate_configuration(device_capability=DeviceCapability(9, 0),
                                             **_selector_config(mla)._asdict())
        assert reasons == []
        assert ".".join(cls.full_cls_name()) == _class_path(mla)


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODELS))
def test_vllms_cuda_selector_takes_custom_for_both_kinds(model_dirs, model):
    """The same through vLLM's CUDA platform itself (it needs vLLM's CUDA extension)."""
    cuda = pytest.importorskip("vllm.platforms.cuda", exc_type=ImportError)
    integration.register()
    mla = model == "deepseek_v3"
    with set_current_vllm_config(_config(model_dirs[model], 1, "CUSTOM")):
        path = cuda.CudaPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM,
                                                      attn_selector_config=_selector_config(mla))
    assert path == _class_path(mla)
