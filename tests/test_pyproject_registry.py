"""pyproject.toml as the Comfy Registry and comfy-cli read it (no network).

The static checks follow the registry's pyproject specification (what ``comfy node validate`` and
``comfy node publish`` read). Where comfy-cli is installed (the ``dev`` extra), its own parser reads
the file without a warning and ``comfy node validate`` passes: it parses the file, requires a
version, and runs its ruff security rules (exec, eval, several statements on one line).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
HAS_COMFY_CLI = importlib.util.find_spec("comfy_cli") is not None


def load() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def test_the_fields_the_registry_requires():
    data = load()
    project, comfy = data["project"], data["tool"]["comfy"]
    # the node id: `comfy node install <name>`
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert set(project["license"]) <= {"text", "file"} and project["license"]
    assert project["description"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy.get("Icon", "") == "" or comfy["Icon"].startswith("https://")
    part = r"(?:==|>=|<=|!=|~=|>|<|<>|=)?\s*\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?"
    assert all(re.fullmatch(part, p.strip()) for p in comfy["requires-comfyui"].split(","))
    accelerators = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend"}
    accelerators.add("GPU :: Apple Metal")
    for classifier in project.get("classifiers", []):
        if classifier.startswith("Environment ::"):
            assert classifier.removeprefix("Environment :: ") in accelerators
        if classifier.startswith("Operating System ::"):
            assert classifier.split(" :: ")[1] in {"Microsoft", "POSIX", "MacOS", "OS Independent"}
    assert any(dep.startswith("comfy-cli") for dep in project["optional-dependencies"]["dev"])
    # ComfyUI loads the pack from its folder: the entry points it looks for
    init = (ROOT / "__init__.py").read_text()
    assert "comfy_entrypoint" in init and "WEB_DIRECTORY" in init


@pytest.mark.skipif(not HAS_COMFY_CLI, reason="comfy-cli is not installed (pip install -e '.[dev]')")
def test_comfy_cli_reads_the_file_without_a_warning(capsys):
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(PYPROJECT))
    printed = capsys.readouterr()
    assert config is not None and "Warning" not in printed.out + printed.err
    assert config.project.name == load()["project"]["name"] and config.project.version
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_comfyui_version == load()["tool"]["comfy"]["requires-comfyui"]
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name


@pytest.mark.skipif(not HAS_COMFY_CLI, reason="comfy-cli is not installed (pip install -e '.[dev]')")
def test_comfy_node_validate_passes(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "DO_NOT_TRACK": "1", "COMFY_NO_UPDATE_CHECK": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-json", "node", "validate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All validation checks passed" in out.stdout and "Security warnings" not in out.stdout
