"""The relay: forwards WireGuard ciphertext between two sites it cannot read."""
