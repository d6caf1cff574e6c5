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
    choice). Ours: on CUDA always the absorbed form (the latent kernel; MLA's MHA prefill
    has no kernel yet), on CPU the triton backend's choice (the reference serves both)."""
    try:
        from sglang.srt.models.deepseek_common.attention_backend_handler import (
            AttentionBackendRegistry, handle_attention_triton)
        from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
            AttnForwardMethod)
    except ImportError:  # an SGLang without DeepSeek's common code: nothing asks
        return

    def handle_attention_attn_backend(attn, forward_batch):
        if forward_batch.seq_lens.is_cuda:
            return AttnForwardMethod.MLA
        return handle_attention_triton(attn, forward_batch)

    AttentionBackendRegistry.register(BACKEND_NAME, handle_attention_attn_backend)
