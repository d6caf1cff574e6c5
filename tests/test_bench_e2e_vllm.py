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


def test_agreement_is_reported_for_every_pair_that_ran_ours_first():
    ours = [[5, 6, 7, 8, 9, 10, 11, 12]] * 3 + [[5, 9, 9, 9, 9, 9, 9, 9]]
    peer = [[5, 6, 7, 8, 9, 10, 11, 12]] * 4
    other = [[4, 6, 7, 8, 9, 10, 11, 12]] + [[5, 6, 7, 8, 9, 10, 11, 12]] * 3
    measured = {(OURS, "8x16"): _result(1, 1, ours), ("TRITON_ATTN", "8x16"): _result(1, 1, peer),
                ("FLASHINFER", "8x16"): _result(1, 1, other)}
    notes = agreement_notes(measured, ["8x16"], ["TRITON_ATTN", "FLASH_ATTN", OURS, "FLASHINFER"])
    assert notes == [
        "agreement CUSTOM vs TRITON_ATTN at 8x16: first 1 greedy tokens identical in 100% of 4 "
        "prompts",
        "agreement CUSTOM vs TRITON_ATTN at 8x16: first 8 greedy tokens identical in 75% of 4 "
        "prompts",
        "agreement CUSTOM vs FLASHINFER at 8x16: first 1 greedy tokens identical in 75% of 4 "
        "prompts",
        "agreement CUSTOM vs FLASHINFER at 8x16: first 8 greedy tokens identical in 50% of 4 "
        "prompts",
        "agreement TRITON_ATTN vs FLASHINFER at 8x16: first 1 greedy tokens identical in 75% of 4 "
        "prompts",
        "agreement TRITON_ATTN vs FLASHINFER at 8x16: first 8 greedy tokens identical in 75% of 4 "
        "prompts"]
    assert agreement_notes({(OURS, "8x16"): _result(1, 1, ours)}, ["8x16"], [OURS]) == []


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


def test_rows_take_the_median_over_engines():
    from bench.e2e_vllm import over_engines

    results = [_result(100.0, 10.0, [[1]]), _result(300.0, 30.0, [[2]]),
               _result(200.0, 50.0, [[3]])]
    assert over_engines(results) == {"prefill": 200.0, "decode": 30.0, "tokens": [[1]]}


def test_main_runs_every_engine_in_turns_and_publishes_the_medians(tmp_path, monkeypatch):
    import json

    import bench.e2e_vllm as e2e

    order, published = [], {}
    decode = {("CUSTOM", 0): 110.0, ("CUSTOM", 1): 90.0, ("CUSTOM", 2): 100.0,
              ("TRITON_ATTN", 0): 95.0, ("TRITON_ATTN", 1): 105.0, ("TRITON_ATTN", 2): 99.0}

    def fake_worker(model, backend, shape, args, log, result):
        engine = sum(1 for b, _ in order if b == backend)
        order.append((backend, shape))
        log.write_text("ok\n")
        result.write_text(json.dumps(_result(1000.0 + engine, decode[(backend, engine)],
                                             [[7, 8]])))
        return 0

    monkeypatch.setattr(e2e, "run_worker", fake_worker)
    monkeypatch.setattr(e2e, "write_model_dir", lambda path, **kw: tmp_path / "model")
    monkeypatch.setattr(e2e, "publish",
                        lambda rows, notes, name, out, engine: published.update(rows=rows,
                                                                                notes=notes,
                                                                                name=name))
    code = e2e.main(["--backends", "CUSTOM", "TRITON_ATTN", "--shapes", "8x64", "--engines",
                     "3", "--weights", "dummy", "--log-dir", str(tmp_path / "logs")])
    assert code == 0
    assert published["name"] == "e2e_vllm"
    assert [b for b, _ in order] == ["CUSTOM", "TRITON_ATTN", "TRITON_ATTN", "CUSTOM",
                                     "CUSTOM", "TRITON_ATTN"]
    assert published["rows"] == [
        {"case": "b8_in64_out128_prefill", "ours": 1001.0, "peers": {"TRITON_ATTN": 1001.0}},
        {"case": "b8_in64_out128_decode", "ours": 100.0, "peers": {"TRITON_ATTN": 99.0}}]
    assert "CUSTOM 8x64 decode per engine: 110 / 90 / 100" in published["notes"]


def test_results_of_another_depth_are_named_by_it():
    from bench.e2e_vllm import benchmark_name

    assert benchmark_name(4) == "e2e_vllm"
    assert benchmark_name(32) == "e2e_vllm_32layers"


def test_a_profiled_generate_leaves_its_trace_and_summary_beside_the_result(tmp_path):
    """--profile-steps: the worker's extra generate runs under torch.profiler; its chrome trace
    and the summary of it (CPU ops here, GPU kernels too on a GPU) land beside the result."""
    import torch

    from bench.e2e_vllm import profile_steps, trace_paths

    asked = []

    def run(tokens):
        asked.append(tokens)
        torch.randn(64, 64) @ torch.randn(64, 64)
        return 0.004, []

    result = tmp_path / "CUSTOM_8x64.json"
    profile_steps(run, 3, result)
    trace, summary = trace_paths(result)
    assert asked == [4]
    assert trace.exists() and trace.name == "CUSTOM_8x64_trace.json.gz"
    lines = summary.read_text().splitlines()
    assert lines[0] == "one generate of 1 prefill + 3 decode steps under the profiler: 4.0 ms wall"
    assert any(line.startswith("== CPU ops:") for line in lines)
    assert any("aten::mm" in line for line in lines)


def test_trace_summary_totals_each_category_by_name(tmp_path):
    import gzip
    import json

    from bench.trace_summary import load, summarize

    events = [{"ph": "X", "cat": "kernel", "name": "decode", "dur": 1500},
              {"ph": "X", "cat": "kernel", "name": "decode", "dur": 500},
              {"ph": "X", "cat": "kernel", "name": "write", "dur": 250},
              {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "dur": 40},
              {"ph": "i", "cat": "kernel", "name": "instant", "dur": 9999}]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    lines = summarize(load(str(path)), top=5)
    assert lines[:3] == ["== GPU kernels: 2.25 ms in 3 events",
                         "    2.000 ms      2x  decode", "    0.250 ms      1x  write"]
    assert lines[3:5] == ["== CPU ops: 0.04 ms in 1 events", "    0.040 ms      1x  aten::copy_"]
    assert lines[5] == "== Python functions: 0.00 ms in 0 events"


def test_main_notes_each_engines_profile(tmp_path, monkeypatch):
    import json

    import bench.e2e_vllm as e2e

    published = {}

    def fake_worker(model, backend, shape, args, log, result):
        assert args.profile_steps == 8
        log.write_text("ok\n")
        result.write_text(json.dumps(_result(1000.0, 100.0, [[7, 8]])))
        if backend == "CUSTOM":
            e2e.trace_paths(result)[1].write_text("one generate: 9.0 ms wall\n== GPU kernels: "
                                                  "5.00 ms in 80 events\n    2.000 ms ...\n")
        return 0

    monkeypatch.setattr(e2e, "run_worker", fake_worker)
    monkeypatch.setattr(e2e, "write_model_dir", lambda path, **kw: tmp_path / "model")
    monkeypatch.setattr(e2e, "publish", lambda rows, notes, name, out, engine:
                        published.update(notes=notes))
    assert e2e.main(["--backends", "CUSTOM", "TRITON_ATTN", "--shapes", "8x64", "--weights",
                     "dummy", "--profile-steps", "8", "--log-dir", str(tmp_path / "logs")]) == 0
    assert "CUSTOM_8x64 profile: one generate: 9.0 ms wall == GPU kernels: 5.00 ms in 80 events" \
        in published["notes"]
    assert "TRITON_ATTN_8x64 profile: no trace written (see its log)" in published["notes"]
