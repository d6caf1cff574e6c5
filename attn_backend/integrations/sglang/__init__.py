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
