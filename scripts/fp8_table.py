"""Prints the FP8 rows of a decode or prefill result JSON against FlashInfer's (the faster of
its kernels on the same FP8 cache) and against our bf16 row of the same shape (time ratio)."""

import json
import sys

for path in sys.argv[1:]:
    rows = {row["case"]: row for row in json.load(open(path))["rows"]}
    print(f"== {path}\ncase | ours | best flashinfer | ours / flashinfer | fp8 / bf16 time")
    for case, row in rows.items():
        if "_fp8e4m3_" not in case:
            continue
        peers = {k: v for k, v in row["peers"].items() if k.startswith("flashinfer")}
        best = max(peers.values()) if peers else None
        bf16 = rows.get(case.replace("_fp8e4m3_", "_bf16_"))
        ratio = f"{row['ours_us'] / bf16['ours_us']:.3f}" if bf16 else "-"
        versus = f"{row['ours'] / best:.3f}" if best else "-"
        print(f"{case} | {row['ours']} | {best} | {versus} | {ratio}")
