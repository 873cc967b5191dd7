# meshwright: a podman connection with pipelining, for the lab's containers.
"""Connection plugin: run tasks in a running podman container with ``podman exec -i``."""

from __future__ import annotations

DOCUMENTATION = r"""
name: podman_exec
short_description: Run tasks in a running podman container, with pipelining
description:
  - Runs each command with C(podman exec -i), passing the module on standard input when
    pipelining is on, so a task costs one C(podman exec) instead of four (make a temporary
    directory, copy, run, remove).
  - Files are copied with C(podman cp).
  - The lab inventory that C(meshwright lab up) writes uses it; C(containers.podman.podman)
    does the same work without pipelining.
author: meshwright
options:
  remote_addr:
    description: Name or ID of the container.
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
  pipelining:
    description: Pass modules on standard input instead of copying them into the container.
    default: true
    type: boolean
    vars:
      - name: ansible_pipelining
"""

# Imports follow DOCUMENTATION, by Ansible's convention.
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from ansible.errors import AnsibleConnectionFailure, AnsibleError  # noqa: E402
from ansible.module_utils.common.text.converters import to_text  # noqa: E402
from ansible.plugins.connection import ConnectionBase  # noqa: E402
from ansible.utils.display import Display  # noqa: E402

display = Display()


class Connection(ConnectionBase):
    """Every operation is one short-lived ``podman`` process; nothing stays connected."""

    transport = "podman_exec"
    has_pipelining = True

    def _podman(self, args: list[str], in_data: bytes | None = None) -> tuple[int, bytes, bytes]:
        podman = shutil.which("podman")
        if podman is None:
            raise AnsibleError("podman_exec: no podman command in PATH")
        command = [podman, *args]
        display.vvv(f"PODMAN {command}", host=self._play_context.remote_addr)
        completed = subprocess.run(command, input=in_data, capture_output=True, check=False)
        return completed.returncode, completed.stdout, completed.stderr

    @property
    def _container(self) -> str:
        return str(self.get_option("remote_addr"))

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        argv = shlex.split(to_text(cmd, errors="surrogate_or_strict"))
        stdin = ["-i"] if in_data is not None else []
        return self._podman(["exec", *stdin, self._container, *argv], in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        rc, _, err = self._podman(["cp", in_path, f"{self._container}:{out_path}"])
        if rc != 0:
            raise AnsibleConnectionFailure(f"podman cp to {out_path}: {to_text(err).strip()}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        rc, _, err = self._podman(["cp", f"{self._container}:{in_path}", out_path])
        if rc != 0:
            raise AnsibleConnectionFailure(f"podman cp from {in_path}: {to_text(err).strip()}")

    def close(self) -> None:
        self._connected = False
