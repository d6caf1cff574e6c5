"""The end-to-end benchmark's parsing (CPU): results files and greedy generations."""

from __future__ import annotations

import json

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
