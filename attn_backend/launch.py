"""Run an SGLang entry point with attn_backend registered first.

    python -m attn_backend.launch sglang.benchmark.one_batch --attention-backend attn_backend ...
    python -m attn_backend.launch sglang.launch_server --attention-backend attn_backend ...

Needed for SGLang modules that parse their arguments before loading plugins
(`sglang.benchmark.one_batch`, `sglang.benchmark.offline_throughput`,
`sglang.bench_one_batch` in older releases). Registration happens at import,
so spawned workers, which re-import this module as `__mp_main__`, register too.
"""

import runpy
import sys

from attn_backend.integrations.sglang import register

register()

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m attn_backend.launch <sglang module> [arguments...]")
    module = sys.argv.pop(1)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
