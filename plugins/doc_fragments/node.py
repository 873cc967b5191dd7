"""The option every module that runs meshwright's node code shares."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  node_artifact:
    description:
      - meshwright's node artifact on the node, from which this module imports its code
        (installed by the C(meshwright.mesh.node) role, which every playbook of the collection
        runs first).
    type: path
    default: /opt/meshwright/lib/meshwright-node.pyz
"""
