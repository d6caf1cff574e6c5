"""Adds the peers of other runs of a benchmark to a result, case by case: e.g. a second FlashInfer
release timed in the same GPU call (scripts/gpu_flashinfer_peer.sh) beside the main run's peers.

    python -m bench.merge_peers MAIN.json EXTRA.json [EXTRA2.json ...] --out MERGED.json

The result is MAIN with each row's peers joined by the EXTRA rows' peers of the same case (an
EXTRA run's own figures, `ours`, are left out: ours is MAIN's), and the EXTRA runs' notes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge_peers(main: dict, extras: list[dict]) -> dict:
    for extra in extras:
        if extra["benchmark"] != main["benchmark"]:
            raise ValueError(f"cannot merge {extra['benchmark']} peers into {main['benchmark']}")
    by_case = [{row["case"]: row for row in extra["rows"]} for extra in extras]
    rows = []
    for row in main["rows"]:
        peers = dict(row.get("peers", {}))
        for cases in by_case:
            peers.update(cases.get(row["case"], {}).get("peers", {}))
        rows.append({**row, "peers": dict(sorted(peers.items()))})
    notes = list(dict.fromkeys(main.get("notes", []) +
                               [note for extra in extras for note in extra.get("notes", [])]))
    return {**main, "rows": rows, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main", type=Path)
    parser.add_argument("extras", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    merged = merge_peers(json.loads(args.main.read_text()),
                         [json.loads(path.read_text()) for path in args.extras])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
