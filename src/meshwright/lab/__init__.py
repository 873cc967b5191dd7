"""The lab: the internet, its NATs and relays, as podman containers on one machine."""
