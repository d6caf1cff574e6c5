"""Declare attn_backend's plugin entry points in a folder on sys.path, without installing it.

    python scripts/declare_entry_points.py SITE_DIR

SGLang and vLLM find plugins through package metadata (`importlib.metadata.entry_points`), which
an uninstalled checkout on PYTHONPATH does not have. The GPU machine runs the checkout that way
(its extension is JIT-built), so its runner writes `attn_backend-<version>.dist-info` here: the
metadata and pyproject.toml's entry points, nothing else (the code stays the checkout's).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declare(site: Path) -> Path:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = project.get("entry-points", {})
    lines = []
    for group, points in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{point} = {target}" for point, target in points.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return info


if __name__ == "__main__":
    print(declare(Path(sys.argv[1])))
