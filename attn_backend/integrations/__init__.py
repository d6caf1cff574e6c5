"""Engine integrations: `attn_backend.integrations.sglang` and `attn_backend.integrations.vllm`.

Each translates its engine's metadata into the shared plan/run core and nothing
more; they are imported only by the engines' plugin entry points, so importing
`attn_backend` never imports an engine.
"""
