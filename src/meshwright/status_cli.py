"""`meshwright status`: every pair of the mesh as planned and as it is now.

The adapter: it runs the playbook ``meshwright.mesh.status`` (the one way of gathering: the
``mesh_status`` module on every site in parallel, combined with the plan on the controller by
:mod:`meshwright.status`) with ``-e mesh_status_file=<temporary file>``, then prints the table
or the JSON from that file. ``ansible-playbook`` is the one beside this Python (the virtual
environment's), else the first on ``PATH``; it runs with this process's environment and
working directory, so ``ansible.cfg`` and ``ANSIBLE_COLLECTIONS_PATH`` apply as to any run.

Exit status: 0 every site answered, 1 some site could not be read (what there is is printed)
or there is no status at all, 2 a usage error (argparse). See docs/status.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from meshwright.status import StatusError, render_table, to_json

__all__ = ["EXIT_ALL", "EXIT_MISSING", "PLAYBOOK", "ansible_playbook", "command", "run"]

EXIT_ALL, EXIT_MISSING = 0, 1
PLAYBOOK = "meshwright.mesh.status"
# Lines of ansible-playbook's output shown when it wrote no status.
TAIL = 40


def ansible_playbook() -> str | None:
    """``ansible-playbook`` beside this Python (a virtual environment's), else on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ansible-playbook")


def command(program: str, status_file: Path, inventories: Sequence[str] | None) -> list[str]:
    """The ansible-playbook command line (``-e`` as JSON: any file name survives it)."""
    argv = [program, PLAYBOOK, "-e", json.dumps({"mesh_status_file": str(status_file)})]
    for source in inventories or ():
        argv += ["-i", source]
    return argv


def run(
    inventories: Sequence[str] | None,
    as_json: bool,
    output: Path | None,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    program = ansible_playbook()
    if program is None:
        print("status: ansible-playbook is not installed (pip install ansible-core)", file=stderr)
        return EXIT_MISSING
    with tempfile.TemporaryDirectory(prefix="meshwright-status-") as directory:
        status_file = Path(directory) / "status.json"
        done = subprocess.run(
            command(program, status_file, inventories),
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
        )
        text = status_file.read_text(encoding="utf-8") if status_file.exists() else None
    if text is None:
        lines = (done.stdout + done.stderr).strip().splitlines()
        print(
            f"status: ansible-playbook {PLAYBOOK} wrote no status (exit {done.returncode}):",
            *lines[-TAIL:],
            sep="\n",
            file=stderr,
        )
        return EXIT_MISSING
    try:
        status = json.loads(text)
        table = render_table(status)
    except (ValueError, StatusError, KeyError, TypeError, AttributeError) as exc:
        print(f"status: the playbook's status file is malformed: {exc}", file=stderr)
        return EXIT_MISSING
    if output is not None:
        try:
            output.write_text(to_json(status), encoding="utf-8")
        except OSError as exc:
            print(f"status: {output}: {exc.strerror}", file=stderr)
            return EXIT_MISSING
    stdout.write(to_json(status) if as_json else table)
    return EXIT_MISSING if status.get("unreachable") else EXIT_ALL
