"""meshwright: a Git-tracked Ansible inventory of sites, turned into a WireGuard mesh."""

__version__ = "0.1.0"
