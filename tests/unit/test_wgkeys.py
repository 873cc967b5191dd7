"""meshwright.site.keys and the wireguard-tools X25519 under it: RFC 7748's vectors, Debian's
`wg genkey`/`wg pubkey`, an independent implementation, and the pinned preshared-key derivation."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey as Reference
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey as ReferencePublic
from wireguard_tools import WireguardKey
from wireguard_tools.curve25519 import X25519PrivateKey

from meshwright.site import keys as wgkeys

H = bytes.fromhex

# RFC 7748 section 5.2: (scalar, u-coordinate, output).
SCALAR_MULT = [
    (
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
    ),
    (
        "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
    ),
]
# RFC 7748 section 6.1: Alice's and Bob's key pairs and their shared secret.
ALICE = (
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
)
BOB = (
    "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
)
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def x25519(scalar: bytes, u: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(scalar).exchange(u)


@pytest.mark.parametrize(("scalar", "u", "out"), SCALAR_MULT)
def test_rfc7748_scalar_multiplication(scalar, u, out):
    assert x25519(H(scalar), H(u)).hex() == out


def test_rfc7748_iterated_1_and_1000_times():
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = x25519(k, u), k
        if i == 1:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_rfc7748_diffie_hellman():
    for private, public in (ALICE, BOB):
        assert WireguardKey(H(private)).public_key().keydata.hex() == public
    assert x25519(H(ALICE[0]), H(BOB[1])).hex() == SHARED
    assert x25519(H(BOB[0]), H(ALICE[1])).hex() == SHARED


def wg(*args: str, stdin: str = "") -> str:
    """Debian's wg; missing, the test fails (apt-get install wireguard-tools)."""
    assert shutil.which("wg"), "the wg command (Debian package wireguard-tools) is missing"
    return subprocess.run(
        ["wg", *args], input=stdin, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_public_keys_match_wg_pubkey():
    keys = [str(WireguardKey.generate()) for _ in range(20)]
    keys += [wg("genkey") for _ in range(20)]
    for private in keys:
        assert str(wgkeys.parse_key(private).public_key()) == wg("pubkey", stdin=private + "\n")


def test_generated_keys_are_clamped_as_wg_genkey_makes_them():
    keys = {WireguardKey.generate().keydata for _ in range(64)}
    assert len(keys) == 64
    for key in [*keys, base64.b64decode(wg("genkey"))]:
        assert len(key) == 32
        assert key[0] & 7 == 0
        assert key[31] & 0x80 == 0
        assert key[31] & 0x40 == 0x40


def _raw(private: Reference) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(private: Reference) -> bytes:
    public = private.public_key()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_shared_secrets_match_an_independent_implementation():
    for _ in range(10):
        ours, theirs = WireguardKey.generate(), Reference.generate()
        expected = theirs.exchange(ReferencePublic.from_public_bytes(ours.public_key().keydata))
        assert x25519(ours.keydata, _raw_public(theirs)) == expected
        assert WireguardKey(_raw(theirs)).public_key().keydata == _raw_public(theirs)


def test_key_text_form_round_trips():
    private = WireguardKey.generate()
    text = str(private)
    assert len(text) == 44 and text.endswith("=")
    assert wgkeys.parse_key(text) == private
    assert wgkeys.parse_key(text + "\n") == private
    assert wgkeys.parse_key(text.encode()) == private


SECRET = str(WireguardKey(bytes(range(32))))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (SECRET[:-1], "44 base64 characters"),
        (SECRET + "AAAA", "44 base64 characters"),
        (SECRET[:20] + "\n" + SECRET[20:], "one line"),
        ("!" * 43 + "=", "not valid base64"),
        (SECRET[:-2] + "B=", "canonical"),  # the last character's spare bits must be zero
        (str(WireguardKey(b"\xfb" * 32)).replace("/", "_"), "canonical"),  # URL-safe alphabet
        (base64.b64encode(bytes(33)).decode(), "base64 of 32 bytes"),
        (b"\xff" * 44, "not ASCII"),
    ],
)
def test_malformed_keys_are_refused_without_quoting_them(text, reason):
    with pytest.raises(wgkeys.KeyFormatError) as caught:
        wgkeys.parse_key(text)
    message = str(caught.value)
    assert reason in message
    stripped = text.strip() if isinstance(text, str) else ""
    if len(stripped) > 4:
        assert stripped[:8] not in message


def test_hex_keys_that_the_library_takes_are_refused():
    with pytest.raises(wgkeys.KeyFormatError, match="44 base64 characters"):
        wgkeys.parse_key(bytes(range(32)).hex())


def test_error_never_contains_a_real_private_key():
    private = str(WireguardKey.generate())
    for bad in (private[:-1], private + "x", private[:10] + "\n" + private[10:]):
        with pytest.raises(wgkeys.KeyFormatError) as caught:
            wgkeys.parse_key(bad)
        assert private[:8] not in str(caught.value)


# RFC 5869 appendix A, test cases 1 and 3: (ikm, salt, info, length, okm).
HKDF_VECTORS = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_VECTORS)
def test_hkdf_matches_rfc5869(ikm, salt, info, length, okm):
    assert wgkeys.hkdf_sha256(H(ikm), H(salt), H(info), length) == H(okm)


def test_preshared_keys_are_pinned():
    # Computed by the hand-written X25519 this module had before wireguard-tools: a change
    # here would make every deployed pair's keys differ at its two ends during an upgrade.
    alice, bob = WireguardKey(H(ALICE[0])), WireguardKey(H(BOB[0]))
    assert str(wgkeys.pair_preshared_key(alice, bob.public_key())) == (
        "+sskoJZ/fcJ5YwOQ0q6vcr+E/1ngoHZjk4hduyl/FQA="
    )
    assert str(wgkeys.pair_preshared_key(bob, alice.public_key(), b"vaulted")) == (
        "3LfjxYh/ZxoG/XSpDp+SlB8mAJEejlPfnkxUL6Q2/dM="
    )


def test_preshared_key_is_the_documented_hkdf():
    a, b = WireguardKey.generate(), WireguardKey.generate()
    shared = Reference.from_private_bytes(a.keydata).exchange(
        ReferencePublic.from_public_bytes(b.public_key().keydata)
    )
    info = b"".join(sorted((a.public_key().keydata, b.public_key().keydata)))
    expected = wgkeys.hkdf_sha256(shared + b"s", b"meshwright preshared key v1", info)
    assert wgkeys.pair_preshared_key(a, b.public_key(), b"s").keydata == expected


def test_both_ends_of_a_pair_derive_the_same_preshared_key():
    a, b, c = (WireguardKey.generate() for _ in range(3))
    ab = wgkeys.pair_preshared_key(a, b.public_key())
    assert ab == wgkeys.pair_preshared_key(b, a.public_key())
    assert len(ab.keydata) == 32
    # Another pair, or the same pair with a mesh secret, gets another key.
    assert ab != wgkeys.pair_preshared_key(a, c.public_key())
    with_secret = wgkeys.pair_preshared_key(a, b.public_key(), b"vaulted")
    assert with_secret == wgkeys.pair_preshared_key(b, a.public_key(), b"vaulted")
    assert with_secret != ab


def test_preshared_key_refuses_a_low_order_peer_key():
    with pytest.raises(wgkeys.KeyFormatError, match="low-order"):
        wgkeys.pair_preshared_key(WireguardKey.generate(), WireguardKey(bytes(32)))
