"""scripts/pack_site.sh: wheel folders repacked into one xz archive for one carry to the GPU
machine, laid out as pip's --target would (a .data folder's purelib merged, scripts left out)."""

import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pack_site.sh"


def write_wheel(folder: Path, name: str, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_two_folders_into_one_archive_with_data_folders_placed(tmp_path):
    write_wheel(tmp_path / ".whl_a", "alpha", {
        "alpha/__init__.py": "A = 1\n",
        "alpha-1.0.dist-info/METADATA": "Name: alpha\n",
        "alpha-1.0.data/purelib/alpha_extra.py": "B = 2\n",
        "alpha-1.0.data/scripts/alpha-cli": "#!/bin/sh\n",
    })
    write_wheel(tmp_path / ".whl_b", "beta", {"beta/__init__.py": "C = 3\n"})
    result = subprocess.run(["bash", str(SCRIPT), ".whl_t_site", ".whl_a", ".whl_b"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "alpha-1.0.data: merged purelib ; left out scripts" in result.stdout
    assert ".whl_t_site/site.tar.xz: 2 wheels" in result.stdout
    with tarfile.open(tmp_path / ".whl_t_site" / "site.tar.xz") as archive:
        names = {name.lstrip("./") for name in archive.getnames()}
        assert archive.extractfile("./alpha_extra.py").read() == b"B = 2\n"
    assert {"alpha/__init__.py", "alpha-1.0.dist-info/METADATA", "alpha_extra.py",
            "beta/__init__.py"} <= names
    assert not any(".data" in name or "alpha-cli" in name for name in names)


@pytest.mark.parametrize("args, message", [
    (["site_out", ".whl_a"], "must be named .whl_<name>_site"),
    ([".whl_t_site", ".whl_missing"], "no wheels in .whl_missing"),
    ([".whl_t_site"], "name the wheel folders"),
])
def test_bad_arguments_are_refused(tmp_path, args, message):
    write_wheel(tmp_path / ".whl_a", "alpha", {"alpha/__init__.py": ""})
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert message in result.stderr
