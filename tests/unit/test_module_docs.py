"""Every module's documentation renders with ansible-doc (a stray ': ' in YAML would not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(ROOT.glob("plugins/modules/*.py")) + sorted(ROOT.glob("roles/*/library/*.py"))


@pytest.mark.parametrize("module", MODULES, ids=[m.stem for m in MODULES])
def test_documentation_examples_and_return_render(module: Path):
    ansible_doc = Path(sys.executable).parent / "ansible-doc"
    run = subprocess.run(
        [str(ansible_doc), "--json", "-M", str(module.parent), module.stem],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)[module.stem]
    assert doc["doc"]["short_description"] and doc["doc"]["description"]
    assert all(isinstance(line, str) for line in doc["doc"]["description"])
    assert all(isinstance(line, str) for line in doc["doc"].get("notes", []))
    assert doc["examples"] and doc["return"]
