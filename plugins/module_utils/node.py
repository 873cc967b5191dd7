"""Import meshwright's node code from the node artifact, for modules running on nodes.

Node code exists once, in the ``meshwright`` package; it reaches nodes as the node artifact
(a zipapp installed by the ``meshwright.mesh.node`` role), not as a copy under module_utils.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

NODE_ARTIFACT = "/opt/meshwright/lib/meshwright-node.pyz"
NODE_ARTIFACT_SPEC: dict[str, Any] = {"type": "path", "default": NODE_ARTIFACT}


def import_node(module: Any, name: str) -> ModuleType:
    """``meshwright.<name>`` from the artifact named by the module's ``node_artifact`` option.

    Fails the module with one sentence when the artifact is missing (in check mode on a node
    that has never been converged, the module reports that instead of failing).
    """
    path = module.params.get("node_artifact") or NODE_ARTIFACT
    if not os.path.isfile(path):
        message = (
            f"meshwright's node artifact is not installed at {path}: run the"
            " meshwright.mesh.node role first (every playbook of the collection does)"
        )
        if module.check_mode:
            module.exit_json(changed=True, skipped=True, msg=message)
        module.fail_json(msg=message)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(f"meshwright.{name}")
