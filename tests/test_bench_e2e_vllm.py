"""bench/e2e_vllm.py's bookkeeping (CPU): rows from the workers' results, agreement, notes."""

from __future__ import annotations

import pytest

from bench.e2e_vllm import OURS, agreement_notes, build_rows, last_error, prompts


def _result(prefill, decode, tokens):
    return {"prefill": prefill, "decode": decode, "tokens": tokens}


def test_rows_pair_ours_with_the_peers_that_ran():
    measured = {(OURS, "64x1024"): _result(1000.0, 500.0, [[1, 2]]),
                ("FLASH_ATTN", "64x1024"): _result(900.0, 450.0, [[1, 2]]),
                ("TRITON_ATTN", "64x4096"): _result(1.0, 1.0, [[3]])}  # ours did not run there
    rows = build_rows(measured, ["64x1024", "64x4096"], [OURS, "FLASH_ATTN", "TRITON_ATTN"], 128)
    assert rows == [
        {"case": "b64_in1024_out128_prefill", "ours": 1000.0, "peers": {"FLASH_ATTN": 900.0}},
        {"case": "b64_in1024_out128_decode", "ours": 500.0, "peers": {"FLASH_ATTN": 450.0}}]


def test_agreement_is_against_the_first_peer_that_ran():
    ours = [[5, 6, 7, 8, 9, 10, 11, 12]] * 3 + [[5, 9, 9, 9, 9, 9, 9, 9]]
    peer = [[5, 6, 7, 8, 9, 10, 11, 12]] * 4
    measured = {(OURS, "8x16"): _result(1, 1, ours), ("TRITON_ATTN", "8x16"): _result(1, 1, peer)}
    notes = agreement_notes(measured, ["8x16"], [OURS, "FLASH_ATTN", "TRITON_ATTN"])
    assert notes == ["agreement CUSTOM vs TRITON_ATTN at 8x16: first 1 greedy tokens identical in "
                     "100% of 4 prompts",
                     "agreement CUSTOM vs TRITON_ATTN at 8x16: first 8 greedy tokens identical in "
                     "75% of 4 prompts"]


def test_prompts_are_seeded_and_inside_the_vocabulary():
    a, b = prompts(4, 32, vocab=100), prompts(4, 32, vocab=100)
    assert a == b and all(10 <= t < 90 for p in a for t in p) and len(a[0]) == 32


def test_a_failed_run_is_noted_by_its_last_error(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("starting\nValueError: Selected backend CUSTOM is not valid\nexiting\n")
    assert last_error(log) == "ValueError: Selected backend CUSTOM is not valid"


def test_random_weights_are_seeded_written_once_and_loadable(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    from bench.e2e_vllm import write_random_weights

    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "a")
    transformers.LlamaConfig.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    write_random_weights(tmp_path / "a")
    write_random_weights(tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert a[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name])
    assert 0.01 < a[name].float().std().item() < 0.04  # not vLLM's +-1e-3 dummy range
    stamp = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    write_random_weights(tmp_path / "a")  # present: left as it is
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == stamp
