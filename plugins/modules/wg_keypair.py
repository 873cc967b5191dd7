#!/usr/bin/python
"""Ansible module wg_keypair: make the node's WireGuard key on the node; return its public key."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wg_keypair
short_description: Make this node's WireGuard key on the node and return only its public key
description:
  - Makes sure a WireGuard private key exists at O(path) on the target, in a file of mode
    C(0600) owned by root in a directory of mode C(0700) owned by root, and returns its public
    key. The private key is made on the node and never leaves it - it is in no return value,
    no diff and no error message of this module.
  - An existing valid key is kept (C(changed=false)); only wrong file or directory modes or
    owners are corrected. O(rotate=true) replaces it with a new key.
  - A key file that exists but does not hold a WireGuard key (44 characters of base64 for
    32 bytes) is an error naming the file and what is wrong, never its content. It is not
    replaced unless O(rotate=true).
  - Keys are made in the module's own process by the Python package wireguard-tools, from
    meshwright's node artifact (X25519 in pure Python over 32 bytes from the OS's CSPRNG,
    clamped, as C(wg genkey) does), so no C(wg) binary and no other process ever sees the
    private key. The public key equals C(wg pubkey)'s.
  - The new file is written next to the old one and renamed over it, so a reader sees the old
    key or the new one, never a partial file.
  - Check mode reports what would change and writes nothing. When no key exists yet, or
    O(rotate=true), the public key is not known before the key is made, so it returns
    RV(public_key=null) and says so in RV(msg).
  - Diff mode shows the public keys (and modes) before and after, never a private key.
version_added: "0.1.0"
author: meshwright
extends_documentation_fragment:
  - meshwright.mesh.node
options:
  path:
    description:
      - The private key file. Its directory is made mode C(0700), owned by root, if missing,
        and corrected to that if not; give the key a directory of its own (such as
        C(/etc/wireguard)), not a shared one. A key directly in C(/) or in a top-level
        directory (such as C(/etc/mesh0.key)) is refused, and nothing is changed.
    type: path
    default: /etc/wireguard/mesh0.key
  rotate:
    description:
      - Replace the key with a new one, also when the existing file is malformed. Every peer
        needs the new public key afterwards.
    type: bool
    default: false
notes:
  - Runs as root (C(become) true), since the key is root's.
  - Needs only Python 3 and meshwright's node artifact on the target.
attributes:
  check_mode:
    support: full
    description: Reports what would change, writes nothing; a key not made yet has no public key.
  diff_mode:
    support: full
    description: Shows the public key (and modes) before and after, never a private key.
  platform:
    support: full
    platforms: posix
    description: Any POSIX system with Python 3; the key file is root's.
"""

EXAMPLES = r"""
- name: Make the node's WireGuard key (kept when it exists)
  wg_keypair:

- name: Rotate the key of interface mesh1
  wg_keypair:
    path: /etc/wireguard/mesh1.key
    rotate: true

- name: Use the public key
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }} has WireGuard public key {{ mesh_wg_public_key }}"
"""

RETURN = r"""
public_key:
  description:
    - The node's WireGuard public key (base64). Null in check mode when the key does not
      exist yet or would be rotated.
  returned: always
  type: str
  sample: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
previous_public_key:
  description: The public key before a rotation (null when there was no valid key).
  returned: when rotated
  type: str
path:
  description: The private key file.
  returned: always
  type: str
  sample: /etc/wireguard/mesh0.key
msg:
  description: What was done, or in check mode what would be done.
  returned: always
  type: str
ansible_facts:
  description: Facts set on the host.
  returned: always
  type: dict
  contains:
    mesh_wg_public_key:
      description: The same as RV(public_key).
      type: str
"""

import os
import stat
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.meshwright.mesh.plugins.module_utils.node import (
    NODE_ARTIFACT_SPEC,
    import_node,
)

wgkeys: Any = None  # meshwright.site.keys, imported from the node artifact by main()

FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_KEY_FILE = 4096  # a key file is 45 bytes; anything much larger is not one


class KeyFileError(Exception):
    """The key file cannot be used. Messages never contain the file's content."""


class MalformedKeyError(KeyFileError):
    """The key file is a regular file that does not hold a key (rotate replaces it)."""


def read_key(path: str) -> tuple[os.stat_result, Any] | None:
    """The key file's status and private key (a WireguardKey: types from the node artifact are
    known only at run time), None when missing; KeyFileError when unusable."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise KeyFileError(f"{path} is a symbolic link; the key must be a regular file")
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    if info.st_size > MAX_KEY_FILE:
        raise MalformedKeyError(
            f"{path} is not a WireGuard private key: it is {info.st_size} bytes long. It was"
            " left as it is: fix or remove it, or run with rotate=true to replace it"
        )
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        text = handle.read(MAX_KEY_FILE + 1)
    try:
        return info, wgkeys.parse_key(text)
    except wgkeys.KeyFormatError as exc:
        raise MalformedKeyError(
            f"{path} is not a WireGuard private key: {exc}. It was left as it is: fix or"
            " remove it, or run with rotate=true to replace it with a new key"
        ) from None


def needs_fixing(info: os.stat_result, mode: int) -> list[str]:
    """What differs from root-owned with `mode`."""
    wrong = []
    if stat.S_IMODE(info.st_mode) != mode:
        wrong.append(f"mode {stat.S_IMODE(info.st_mode):04o} -> {mode:04o}")
    if (info.st_uid, info.st_gid) != (0, 0):
        wrong.append(f"owner {info.st_uid}:{info.st_gid} -> 0:0")
    return wrong


def check_directory(given: str, path: str) -> str:
    """The key's directory, refused when it cannot be one of its own (such as / or /etc)."""
    directory = os.path.dirname(path)
    if given.endswith(os.sep) or not os.path.basename(path):
        raise KeyFileError(f"{given} names a directory, not a key file")
    if len([part for part in directory.split(os.sep) if part]) < 2:
        raise KeyFileError(
            f"{path}: the key's directory {directory} would be made mode 0700; give the key"
            " a directory of its own, such as /etc/wireguard"
        )
    return directory


def ensure_directory(directory: str, check_mode: bool) -> list[str]:
    """Make the key's directory root-owned 0700; return what was (or would be) changed."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        if not check_mode:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            os.chmod(directory, DIR_MODE)
            os.chown(directory, 0, 0)
        return [f"create directory {directory} ({DIR_MODE:04o}, root)"]
    if not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"{directory} is not a directory")
    wrong = needs_fixing(info, DIR_MODE)
    if wrong and not check_mode:
        os.chmod(directory, DIR_MODE)
        os.chown(directory, 0, 0)
    return [f"directory {directory}: {w}" for w in wrong]


def write_key(path: str, private: Any) -> None:
    """Write the key to a new root-only file beside `path` and rename it over `path`."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".wg_keypair.")  # mode 0600
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(str(private).encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def describe(public_key: str | None, extra: list[str]) -> str:
    lines = [f"public_key: {public_key or '(none)'}", *extra]
    return "\n".join(lines) + "\n"


def message(path: str, changes: list[str], check: bool, public: str | None) -> str:
    if not changes:
        return f"{path}: kept the existing key"
    text = f"{path}: {'would ' if check else ''}{'; '.join(changes)}"
    if public is None:
        text += " (the new key's public key is not known in check mode)"
    return text


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/etc/wireguard/mesh0.key"},
            "rotate": {"type": "bool", "default": False},
            "node_artifact": NODE_ARTIFACT_SPEC,
        },
        supports_check_mode=True,
    )
    global wgkeys
    wgkeys = import_node(module, "site.keys")
    given = module.params["path"]
    path = os.path.abspath(given)
    rotate = module.params["rotate"]
    check = module.check_mode

    if os.geteuid() != 0:
        module.fail_json(msg=f"wg_keypair must run as root (become: true) to own {path}")

    try:
        directory = check_directory(given, path)
        # Read (and judge) the key before anything is changed, the directory included.
        try:
            existing = read_key(path)
        except MalformedKeyError:
            if not rotate:
                raise
            existing = None
        changes = ensure_directory(directory, check)
        previous = None if existing is None else str(existing[1].public_key())

        if existing is not None and not rotate:
            wrong = needs_fixing(existing[0], FILE_MODE)
            if wrong and not check:
                os.chmod(path, FILE_MODE)
                os.chown(path, 0, 0)
            changes += [f"key file {w}" for w in wrong]
            public = previous
        else:
            if rotate:
                what = "rotate the key" if existing else "replace the missing or malformed key"
            else:
                what = "make a new key"
            changes.append(what)
            public = None
            if not check:
                private = wgkeys.WireguardKey.generate()
                write_key(path, private)
                public = str(private.public_key())
    except (KeyFileError, OSError) as exc:
        # OSError messages name a file and an errno, never a file's content.
        module.fail_json(msg=str(exc), path=path)

    changed = bool(changes)
    result = {
        "changed": changed,
        "path": path,
        "public_key": public,
        "msg": message(path, changes, check, public),
        "ansible_facts": {"mesh_wg_public_key": public},
    }
    if rotate:
        result["previous_public_key"] = previous
    if module._diff and changed:
        after_public = public if public is not None else "(a new key, made when applied)"
        result["diff"] = {
            "before_header": path,
            "after_header": path,
            "before": describe(previous, []),
            "after": describe(after_public, changes),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
