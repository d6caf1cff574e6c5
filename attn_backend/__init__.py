"""attn_backend: paged-KV attention kernels for LLM serving, with SGLang and vLLM integrations.

CUDA tensors run the compiled kernels (built by setup.py, or JIT-built on first
use); CPU tensors run the float reference (`attn_backend.reference`), which
defines the semantics.
"""

from ._validation import set_debug_checks
from .decode import PagedDecode
from .kv_write import write_kv
from .prefill import PagedPrefill
from .paged_kv import PagedKVCache, PageTable, slots_from_block_table, slots_from_req_to_token

__version__ = "0.1.0"

__all__ = [
    "PageTable",
    "PagedDecode",
    "PagedKVCache",
    "PagedPrefill",
    "set_debug_checks",
    "slots_from_block_table",
    "slots_from_req_to_token",
    "write_kv",
]
