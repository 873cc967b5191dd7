"""WireGuard keys: Curve25519 key pairs and their base64 text form, standard library only.

WireGuard's keys are X25519 keys (RFC 7748): a private key is 32 random bytes, clamped, and
its public key is the X25519 scalar multiplication of it with the base point u = 9. This file
is the whole of it in pure Python, so that the same code runs inside the ``wg_keypair`` module
on a target that has only Debian's python3, with no ``wg`` binary and no process that ever
sees the private key. It is checked against RFC 7748's test vectors (tests/unit) and against
``wg pubkey`` on real nodes (tests/lab).

Timing: Python's integers are not constant-time. A key is made once, on the node, by root;
whoever could time that one computation already holds the node, so it does not matter here.
Do not use this for a long-running service that multiplies secret scalars by peers' points.

Errors (``KeyFormatError``) never quote the text they were given: that text may be a
private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

KEY_LEN = 32
KEY_LEN_BASE64 = 44

_P = 2**255 - 19
_A24 = 121665
_BASE_POINT = (9).to_bytes(KEY_LEN, "little")


class KeyFormatError(ValueError):
    """A text is not a WireGuard key. The message never contains the text itself."""


def clamp(scalar: bytes) -> bytes:
    """Clamp 32 bytes into an X25519 private key (RFC 7748 section 5, as `wg genkey` does)."""
    if len(scalar) != KEY_LEN:
        raise KeyFormatError(f"a key is {KEY_LEN} bytes, not {len(scalar)}")
    clamped = bytearray(scalar)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def x25519(scalar: bytes, u: bytes) -> bytes:
    """X25519(k, u) of RFC 7748 section 5: the Montgomery ladder over Curve25519.

    ``scalar`` is clamped here, as the RFC says; ``u``'s top bit is masked and values
    at or above p are reduced (both as the RFC says for interoperability).
    """
    if len(u) != KEY_LEN:
        raise KeyFormatError(f"a point is {KEY_LEN} bytes, not {len(u)}")
    k = int.from_bytes(clamp(scalar), "little")
    x_1 = (int.from_bytes(u, "little") & ((1 << 255) - 1)) % _P
    x_2, z_2, x_3, z_3 = 1, 0, x_1, 1
    swap = 0
    for t in range(254, -1, -1):
        k_t = (k >> t) & 1
        swap ^= k_t
        if swap:
            x_2, x_3 = x_3, x_2
            z_2, z_3 = z_3, z_2
        swap = k_t
        a = (x_2 + z_2) % _P
        aa = a * a % _P
        b = (x_2 - z_2) % _P
        bb = b * b % _P
        e = (aa - bb) % _P
        c = (x_3 + z_3) % _P
        d = (x_3 - z_3) % _P
        da = d * a % _P
        cb = c * b % _P
        x_3 = (da + cb) ** 2 % _P
        z_3 = x_1 * (da - cb) ** 2 % _P
        x_2 = aa * bb % _P
        z_2 = e * (aa + _A24 * e) % _P
    if swap:
        x_2, z_2 = x_3, z_3
    return (x_2 * pow(z_2, _P - 2, _P) % _P).to_bytes(KEY_LEN, "little")


def generate_private_key() -> bytes:
    """32 bytes from the OS's CSPRNG, clamped: what `wg genkey` makes."""
    return clamp(secrets.token_bytes(KEY_LEN))


def public_key(private_key: bytes) -> bytes:
    """The public key of a private key: X25519(private, 9), what `wg pubkey` prints."""
    return x25519(private_key, _BASE_POINT)


def encode(key: bytes) -> str:
    """A 32-byte key as WireGuard's text form: 44 characters of base64."""
    if len(key) != KEY_LEN:
        raise KeyFormatError(f"a key is {KEY_LEN} bytes, not {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode(text: str | bytes) -> bytes:
    """WireGuard's text form of a key (surrounding whitespace allowed) to its 32 bytes.

    Strict, as `wg` is: exactly 44 characters of canonical base64 ending in '='. The error
    says what is wrong in general terms and never quotes the text.
    """
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
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("it is not valid base64") from None
    if len(raw) != KEY_LEN or base64.b64encode(raw).decode("ascii") != stripped:
        raise KeyFormatError(f"it does not decode to {KEY_LEN} bytes in canonical base64")
    return raw


def generate_keypair() -> tuple[str, str]:
    """A new (private, public) pair, both in WireGuard's base64 text form."""
    private = generate_private_key()
    return encode(private), encode(public_key(private))


def public_key_of(private_text: str | bytes) -> str:
    """The base64 public key of a base64 private key (raises KeyFormatError)."""
    return encode(public_key(decode(private_text)))


PRESHARED_KEY_SALT = b"meshwright preshared key v1"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF with SHA-256 (RFC 5869): extract, then expand to `length` bytes."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // hashlib.sha256().digest_size) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def pair_preshared_key(own_private: bytes, peer_public: bytes, mesh_secret: bytes = b"") -> bytes:
    """The preshared key of this node and one peer; the peer derives the same one.

    Both ends compute X25519(own private, other's public), which is the same value on both
    sides, and stretch it with HKDF, bound to the pair's two public keys (in sorted order)
    and to the optional mesh secret. Nothing is distributed and the controller never holds a
    preshared key. Without a mesh secret this adds no protection against whoever can break
    X25519 (the quantum threat preshared keys are meant for), since it derives from the same
    static keys as the handshake; with one (kept in Ansible Vault), it does. See docs/keys.md.
    """
    shared = x25519(own_private, peer_public)
    if shared == bytes(KEY_LEN):
        raise KeyFormatError("the peer's public key is a low-order point")
    pair = b"".join(sorted((public_key(own_private), bytes(peer_public))))
    return hkdf_sha256(shared + mesh_secret, PRESHARED_KEY_SALT, pair)
