"""WireGuard keys: the strict text form of a key, and the preshared key of a pair.

Key pairs and X25519 come from wireguard-tools (bundled in the node artifact, pure Python):
``WireguardKey.generate()`` makes a private key as ``wg genkey`` does, ``.public_key()`` derives
what ``wg pubkey`` prints, and ``curve25519.X25519PrivateKey(...).exchange(...)`` gives a pair's
shared secret. Two things are our own:

* :func:`parse_key` reads a key as strictly as ``wg`` does: one line of canonical base64.
  ``WireguardKey`` also takes hex and unpadded or URL-safe base64, which ``wg set ... private-key
  FILE`` (wg-quick's ``PostUp``) would refuse at boot. Its errors never quote the text, which may
  be a private key.
* :func:`pair_preshared_key`, the derivation of docs/keys.md.

Timing: the X25519 here runs on Python integers, which are not constant-time. Keys are made and
derived by root, once per run, on the node; whoever could time that already holds the node.
"""

from __future__ import annotations

import hashlib
import hmac

from wireguard_tools import WireguardKey
from wireguard_tools.curve25519 import X25519PrivateKey

__all__ = [
    "KEY_LEN",
    "KeyFormatError",
    "WireguardKey",
    "hkdf_sha256",
    "pair_preshared_key",
    "parse_key",
]

KEY_LEN = 32
KEY_LEN_BASE64 = 44
PRESHARED_KEY_SALT = b"meshwright preshared key v1"


class KeyFormatError(ValueError):
    """A text is not a WireGuard key. The message never contains the text itself."""


def parse_key(text: str | bytes) -> WireguardKey:
    """WireGuard's text form of a key (surrounding whitespace allowed): exactly 44 characters
    of canonical base64 ending in '=', as ``wg`` wants it. Errors say what is wrong in general
    terms."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFormatError("it holds bytes that are not ASCII (base64 text)") from None
    stripped = text.strip()
    if not stripped:
        raise KeyFormatError("it is empty")
    if "\n" in stripped or len(stripped) != KEY_LEN_BASE64:
        raise KeyFormatError(
            f"it is not one line of {KEY_LEN_BASE64} base64 characters"
            f" (found {len(stripped)} characters)"
        )
    try:
        key = WireguardKey(stripped)
    except ValueError:  # binascii.Error is one; neither quotes the text
        raise KeyFormatError(f"it is not valid base64 of {KEY_LEN} bytes") from None
    # The library decodes leniently (URL-safe alphabet, spare bits set): wg does not.
    if str(key) != stripped:
        raise KeyFormatError("it is not in canonical base64, as wg writes keys")
    return key


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF with SHA-256 (RFC 5869): extract, then expand to `length` bytes."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // hashlib.sha256().digest_size) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def pair_preshared_key(
    own_private: WireguardKey, peer_public: WireguardKey, mesh_secret: bytes = b""
) -> WireguardKey:
    """The preshared key of this node and one peer; the peer derives the same one.

    Both ends compute X25519(own private, other's public), which is the same value on both
    sides, and stretch it with HKDF, bound to the pair's two public keys (in sorted order)
    and to the optional mesh secret. Nothing is distributed and the controller never holds a
    preshared key. Without a mesh secret this adds no protection against whoever can break
    X25519 (the quantum threat preshared keys are meant for), since it derives from the same
    static keys as the handshake; with one (kept in Ansible Vault), it does. See docs/keys.md.
    """
    shared = X25519PrivateKey.from_private_bytes(own_private.keydata).exchange(peer_public.keydata)
    if shared == bytes(KEY_LEN):
        raise KeyFormatError("the peer's public key is a low-order point")
    pair = b"".join(sorted((own_private.public_key().keydata, peer_public.keydata)))
    return WireguardKey(hkdf_sha256(shared + mesh_secret, PRESHARED_KEY_SALT, pair))
