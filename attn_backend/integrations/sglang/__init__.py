"""SGLang integration: `--attention-backend attn_backend`.

`register()` is the `sglang.srt.plugins` entry point (see pyproject.toml): SGLang
calls it in every process before parsing arguments, and it adds the name to
the CLI choices and the factory to `ATTENTION_BACKENDS`. It imports no CUDA
code; the kernels load when the backend is built. For SGLang entry points that
parse arguments before loading plugins, use `python -m attn_backend.launch`.
"""

from __future__ import annotations

BACKEND_NAME = "attn_backend"
SUPPORTED_SGLANG = ">=0.5.14,<0.6"  # the out_graph/in_graph metadata API and the plugin group


def register() -> None:
    """Make `attn_backend` selectable in this SGLang process (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import (ATTENTION_BACKENDS,
                                                                register_attention_backend)
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:

        @register_attention_backend(BACKEND_NAME)
        def create_attn_backend(model_runner):
            from .backend import SGLangAttnBackend  # kernels load only when a backend is built

            return SGLangAttnBackend(model_runner)
    _register_mla_forward_method()


def _register_mla_forward_method() -> None:
    """DeepSeek-class models ask SGLang's AttentionBackendRegistry which attention method to
    run per batch, by backend name (an unknown name silently gets the triton backend's
    choice, which never takes the chunked prefix cache). Ours is SGLang's own choice for the
    backends with every MHA form (flashinfer's, under our name): MHA / MHA_ONE_SHOT /
    MHA_CHUNKED_KV for prefills without speculation, the absorbed MLA otherwise. The backend
    serves the three MHA forms (PagedPrefill at head dims (192, 128)); SGLang keeps one-shot and
    the chunked prefix cache for the backends on its two lists, so we join them."""
    try:
        from sglang.srt.models.deepseek_common import attention_backend_handler as handlers
    except ImportError:  # an SGLang without DeepSeek's common code: nothing asks
        return
    one_shot = getattr(handlers, "MHA_ONE_SHOT_SUPPORTED_BACKENDS", None)
    if one_shot is not None and BACKEND_NAME not in one_shot:
        one_shot.append(BACKEND_NAME)
    try:
        from sglang.srt.server_args import CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS
    except ImportError:  # older SGLang: the chunked prefix cache stays off for plugins
        pass
    else:
        if BACKEND_NAME not in CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS:
            CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS.append(BACKEND_NAME)
    choose = getattr(handlers, "_handle_attention_backend", None)

    def handle_attention_attn_backend(attn, forward_batch):
        if choose is None:  # an SGLang without the shared chooser: flashinfer's choices
            return handlers.handle_attention_flashinfer(attn, forward_batch)
        return choose(attn, forward_batch, BACKEND_NAME)

    handlers.AttentionBackendRegistry.register(BACKEND_NAME, handle_attention_attn_backend)
