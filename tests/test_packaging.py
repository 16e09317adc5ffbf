"""pyproject.toml lists packages explicitly (kernels/ and launch/ are renamed): keep the list complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    renamed = {directory: name for name, directory in tool["package-dir"].items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] in ("megamix", *renamed):
            found.add(".".join((renamed.get(parts[0], parts[0]), *parts[1:])))
    assert found == set(tool["packages"])


def test_torch_stays_pinned():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.*" in dependencies  # an unpinned torch pulls GBs of CUDA wheels on CPU machines
