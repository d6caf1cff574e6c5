"""The end-to-end benchmark's parsing (CPU): results files and greedy generations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.e2e_sglang import agreement, parse_generations, throughput_run


def test_throughput_takes_medians_of_the_engine_measurements(tmp_path):
    lines = [{"prefill_throughput": p, "median_decode_throughput": d}
             for p, d in ((100.0, 10.0), (300.0, 30.0), (200.0, 50.0))]
    (tmp_path / "ours_b2_in8_p1.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    result = throughput_run(tmp_path, "ours", 2, 8, 4, 1, tmp_path, timeout=1, resume=True,
                            repeats=3)
    assert result == {"prefill": 200.0, "decode": 30.0, "measurements": 3}


def test_generations_are_the_words_after_each_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\nw4 w5\n")
    log = tmp_path / "run.log"
    log.write_text("noise\n========== Prompt 0 ==========\n<s> w1 w2 w3 w9 w8 w7 \n\n"
                   "========== Prompt 1 ==========\nw4 w5 w6 w6 \n\n")
    outputs = parse_generations(log, prompts, num_prompts=2, tokens=2)
    assert outputs == [["w9", "w8"], ["w6", "w6"]]
    assert parse_generations(log, prompts, num_prompts=3, tokens=2) is None  # a prompt missing
    assert agreement(outputs, [["w9", "w1"], ["w6", "w6"]], first=1) == 1.0
    assert agreement(outputs, [["w9", "w1"], ["w6", "w6"]], first=2) == 0.5


def test_engines_run_in_turns_with_the_backend_order_reversed_every_other_turn():
    from bench.e2e_sglang import engine_turns

    turns = engine_turns(["1x8", "2x4"], ["ours", "fi"], ["ours"], engines=2)
    assert turns == [("ours", "1x8", 1, 0), ("fi", "1x8", 1, 0), ("ours", "2x4", 1, 0),
                     ("fi", "2x4", 1, 0), ("ours", "1x8", 16, 0), ("ours", "2x4", 16, 0),
                     ("fi", "1x8", 1, 1), ("ours", "1x8", 1, 1), ("fi", "2x4", 1, 1),
                     ("ours", "2x4", 1, 1), ("ours", "1x8", 16, 1), ("ours", "2x4", 16, 1)]
    # One engine is the single pass earlier calls made (their logs resume under the same names).
    assert [t[:3] for t in engine_turns(["1x8"], ["ours", "fi"], ["fi"], engines=1)] == \
        [("ours", "1x8", 1), ("fi", "1x8", 1), ("fi", "1x8", 16)]


def test_rows_are_the_median_over_engines(tmp_path):
    from bench.e2e_sglang import over_engines

    results = []
    for engine, decodes in enumerate(((10.0, 12.0, 11.0), (20.0, 19.0, 21.0), (14.0, 15.0, 13.0))):
        name = "ours_b2_in8_p1" + (f"_e{engine}" if engine else "")
        lines = [{"prefill_throughput": 100.0 + engine, "median_decode_throughput": d}
                 for d in decodes]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        results.append(throughput_run(tmp_path, "ours", 2, 8, 4, 1, tmp_path, timeout=1,
                                      resume=True, repeats=3, engine=engine))
    assert [r["decode"] for r in results] == [11.0, 20.0, 14.0]
    assert over_engines(results) == {"prefill": 101.0, "decode": 14.0, "measurements": 9,
                                     "engines": 3}


def test_fp8_runs_have_their_own_names_and_the_engine_flag():
    from pathlib import Path

    from bench.e2e_sglang import kv_tag, one_batch_command

    assert kv_tag("auto") == "" and kv_tag("fp8_e4m3") == "_fp8e4m3"
    command = one_batch_command(Path("m"), "attn_backend", page_size=1, extra=["--x"],
                                kv_cache_dtype="fp8_e4m3")
    assert command[command.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert "--kv-cache-dtype" not in one_batch_command(Path("m"), "triton", page_size=1, extra=[])


def test_fp8_results_resume_under_their_own_name(tmp_path):
    line = json.dumps({"prefill_throughput": 5.0, "median_decode_throughput": 7.0})
    (tmp_path / "ours_b2_in8_p1_fp8e4m3.jsonl").write_text(line + "\n")
    result = throughput_run(tmp_path, "ours", 2, 8, 4, 1, tmp_path, timeout=1, resume=True,
                            repeats=1, kv_cache_dtype="fp8_e4m3")
    assert result == {"prefill": 5.0, "decode": 7.0, "measurements": 1}


def test_the_deepseek_model_is_an_mla_model_with_dense_mlps(tmp_path):
    """--model-kind deepseek: SGLang reads the written directory as an MLA model with one TP-8
    rank's 16 heads, DeepSeek-V3's latent dims and no MoE layer."""
    pytest.importorskip("sglang")
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig

    from bench.e2e_sglang import BENCHMARKS, write_model_dir

    path = write_model_dir(tmp_path / "deepseek", kind="deepseek", vocab=64)
    config = ModelConfig(model_path=str(path))
    assert config.attention_arch == AttentionArch.MLA
    assert (config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim,
            config.qk_nope_head_dim, config.v_head_dim) == (16, 512, 64, 128, 128)
    hf = config.hf_config
    assert hf.first_k_dense_replace >= hf.num_hidden_layers  # every layer's MLP is dense
    assert BENCHMARKS["deepseek"] == "e2e_sglang_mla"
    # SGLang's DeepSeek model reads these as attributes while it builds its layers (moe_layer_freq
    # in every layer, on the H200 a missing one failed every engine); the two left out are read
    # only behind a hasattr (rope_theta) or on paths of quantised checkpoints.
    import sglang.srt.models.deepseek_v2 as deepseek_model
    source = Path(deepseek_model.__file__).read_text()
    read = set(re.findall(r"(?<![\w.])(?:self\.)?config\.([A-Za-z_]\w*)\b(?!\s*\()", source))
    assert {"moe_layer_freq", "topk_method", "n_routed_experts"} <= read
    missing = {name for name in read if not hasattr(hf, name)}
    assert missing <= {"rope_theta", "quantization_config"}, missing
    with pytest.raises(ValueError, match="model kind"):
        write_model_dir(tmp_path / "other", kind="mamba")
