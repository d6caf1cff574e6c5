"""vLLM integration: `--attention-backend CUSTOM` (or `ATTN_BACKEND`).

`register()` is the `vllm.general_plugins` entry point (see pyproject.toml):
vLLM calls it in every process (front end, engine core, workers) before it
resolves `--attention-backend`. It registers class paths only, so it imports
neither the backend module nor any CUDA code.

Two names select the backend: vLLM's static `CUSTOM` member, which survives any process start
method, and `ATTN_BACKEND` (`ATTN_BACKEND_MLA` for MLA models), enum members added at
registration: vLLM pickles its config into its engine and worker processes, and a spawned process
unpickles it before it loads plugins, so those names work only where vLLM forks (its default
while CUDA is not initialised in the parent; tests/test_vllm_processes.py). vLLM looks a
backend up by its `get_name()`, so each name has its own class.

MLA models (DeepSeek-class) need an MLA class (`mla.AttnBackendMLA`): vLLM's selector checks
`is_mla()`, so one class cannot serve both kinds. `CUSTOM`'s class path is resolved when a
layer is built, and answers by the model (`custom.py`), so `--attention-backend CUSTOM` serves
both.
"""

from __future__ import annotations

import re

BACKEND_NAME = "ATTN_BACKEND"
MLA_BACKEND_NAME = "ATTN_BACKEND_MLA"
SUPPORTED_VLLM = ">=0.32,<0.34"  # the V1 backend API of the contract (K||V-packed caches)

_MODULE = "attn_backend.integrations.vllm.backend"
# CUSTOM resolves by the model being built: the MLA class for MLA models (custom.py).
CUSTOM_CLASS_PATH = "attn_backend.integrations.vllm.custom.Backend"
NAMED_CLASS_PATH = f"{_MODULE}.AttnBackend"
MLA_CLASS_PATH = "attn_backend.integrations.vllm.mla.AttnBackendMLA"
MLA_PREFILL_CLASS_PATH = "attn_backend.integrations.vllm.mla.AttnBackendMLAPrefill"


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release outside the supported range, naming it: the backend classes
    follow one release line's attention API, and an older or newer one fails later and less
    clearly (a missing method, a changed enum) or serves with a changed contract."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"attn_backend: cannot read the vLLM version {version!r}; "
                           f"supported: vllm{SUPPORTED_VLLM}")
    release = (int(match[1]), int(match[2]))
    bounds = [int(x) for x in re.findall(r"\d+", SUPPORTED_VLLM)]  # >=a.b,<c.d
    low, high = tuple(bounds[:2]), tuple(bounds[2:])
    if not low <= release < high:
        raise RuntimeError(f"attn_backend: vLLM {version} is not supported; the backend "
                           f"serves vllm{SUPPORTED_VLLM} (pip install 'attn-backend[vllm]')")


def register() -> None:
    """Make the backend selectable in this vLLM process (idempotent); a vLLM release
    outside SUPPORTED_VLLM stops here, with the range in the message."""
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.v1.attention.backends.mla.prefill.registry import (MLAPrefillBackendEnum,
                                                                 register_mla_prefill_backend)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, CUSTOM_CLASS_PATH)
    for name, path in ((BACKEND_NAME, NAMED_CLASS_PATH), (MLA_BACKEND_NAME, MLA_CLASS_PATH)):
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, path)
    # MLA models' prefill kernel, vLLM's other extension point: our MLA backend takes it by
    # itself; `--attention-config '{"mla_prefill_backend": "CUSTOM"}'` also makes the layers
    # pick it (vLLM's platform default otherwise, which must then import).
    register_mla_prefill_backend(MLAPrefillBackendEnum.CUSTOM, MLA_PREFILL_CLASS_PATH)
