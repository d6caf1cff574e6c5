"""The class behind vLLM's static `CUSTOM` member, chosen by the model being built.

vLLM resolves a backend's class path with `import module; getattr(module, name)` when a
layer selects its backend, inside `set_current_vllm_config` (model construction). `CUSTOM` names
`attn_backend.integrations.vllm.custom.Backend`; this module's `__getattr__` answers with the MLA
class for an MLA model (DeepSeek-class: vLLM's selector requires `is_mla()` of the class) and
the other one otherwise, so `--attention-backend CUSTOM` serves both kinds.

Why not only a new enum name: vLLM pickles its config into engine and worker processes, and a
member added by `register_backend("NAME", ...)` cannot be unpickled in a *spawned* process,
which unpickles its arguments before it loads plugins (tests/test_vllm_processes.py shows
both). `CUSTOM` is a static member, so it survives every start method.
"""

from __future__ import annotations


def backend_class(use_mla: bool) -> type:
    if use_mla:
        from .mla import AttnBackendMLAAsCustom

        return AttnBackendMLAAsCustom
    from .backend import AttnBackendAsCustom

    return AttnBackendAsCustom


def _model_uses_mla() -> bool:
    from vllm.config import get_current_vllm_config

    try:
        model_config = get_current_vllm_config().model_config
    except AssertionError:  # outside model construction (no current config): not a layer
        return False
    return bool(model_config is not None and model_config.use_mla)


def __getattr__(name: str):
    if name == "Backend":
        return backend_class(_model_uses_mla())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
