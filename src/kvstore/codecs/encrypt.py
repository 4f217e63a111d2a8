"""Encryption at rest: the ``aesgcm`` codec and the key ring it takes keys from.

Keys are named by a key id and come from the store config
(``encryption_keys: {id: base64}``) and the environment
(``KVSTORE_ENCRYPTION_KEY`` is the key ``default``;
``KVSTORE_ENCRYPTION_KEYS`` is ``id=base64,id=base64``). A tier encrypts
with one key id (``aesgcm`` or ``aesgcm:<id>``) and decrypts with whichever
key id a chunk names, so keys rotate by adding a new id and keeping the old
one until its chunks are gone. Key bytes never appear in reprs, specs or
error messages.

The payload is framed as: frame version (1 byte, 1), key id length ``k``
(1 byte), the key id (``k`` ASCII bytes), a random 12-byte nonce, then the
AES-GCM ciphertext with its 16-byte tag. The authenticated data binds the
chunk key, dtype, shape, MLA flag, codec ids and the frame prefix, so a
ciphertext moved to another key or header fails to authenticate: a wrong or
missing key and tampering are an IntegrityError (a miss), never garbage.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from typing_extensions import Buffer

from kvstore.codecs.base import ByteCodec, ChunkContext
from kvstore.errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV_KEY = "KVSTORE_ENCRYPTION_KEY"
ENV_KEYS = "KVSTORE_ENCRYPTION_KEYS"
DEFAULT_KEY_ID = "default"
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_SIZES = (16, 24, 32)
NONCE_BYTES = 12
_FRAME_VERSION = 1
_AAD_TAG = b"kvstore-aesgcm-v1\0"


def _aesgcm_class() -> type[AESGCM]:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ConfigError(
            "the aesgcm codec needs the cryptography package: pip install 'kvstore-llm[encryption]'"
        ) from None
    return AESGCM


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise ConfigError(f"an encryption key id is 1-64 of [A-Za-z0-9_.-], got {key_id!r}")
    return key_id


def decode_key(key_id: str, text: str) -> bytes:
    """The bytes of a base64 key; ConfigError (naming only the id) if it is not one."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"encryption key {key_id!r} is not valid base64") from None
    if len(key) not in KEY_SIZES:
        raise ConfigError(f"encryption key {key_id!r} must be 16, 24 or 32 bytes, not {len(key)}")
    return key


class KeyRing:
    """AES keys by key id. Its repr names the ids, never the keys."""

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        keys = dict(keys or {})
        for key_id, key in keys.items():
            check_key_id(key_id)
            if len(key) not in KEY_SIZES:
                raise ConfigError(f"encryption key {key_id!r} must be 16, 24 or 32 bytes")
        cipher = _aesgcm_class() if keys else None
        self._ciphers: dict[str, AESGCM] = {
            key_id: cipher(key) for key_id, key in keys.items() if cipher is not None
        }

    @classmethod
    def load(
        cls, configured: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
    ) -> KeyRing:
        """Keys from a config mapping (id to base64) and the environment, merged.

        The same id given twice with different keys is a ConfigError.
        """
        environ = os.environ if environ is None else environ
        sources: list[tuple[str, str, str]] = [
            (key_id, text, "config") for key_id, text in (configured or {}).items()
        ]
        if environ.get(ENV_KEY, "").strip():
            sources.append((DEFAULT_KEY_ID, environ[ENV_KEY], ENV_KEY))
        for item in environ.get(ENV_KEYS, "").split(","):
            if item.strip():
                key_id, sep, text = item.partition("=")
                if not sep:
                    raise ConfigError(f"{ENV_KEYS} must be id=base64,id=base64")
                sources.append((key_id.strip(), text, ENV_KEYS))
        keys: dict[str, bytes] = {}
        for key_id, text, source in sources:
            key = decode_key(check_key_id(key_id), text)
            if keys.setdefault(key_id, key) != key:
                raise ConfigError(
                    f"encryption key {key_id!r} is given twice, differently ({source})"
                )
        return cls(keys)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._ciphers))

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ciphers

    def cipher(self, key_id: str) -> AESGCM | None:
        return self._ciphers.get(key_id)

    def __repr__(self) -> str:
        return f"KeyRing(ids={list(self.ids)})"


def _aad(context: ChunkContext, prefix: bytes) -> bytes:
    shape = struct.pack(f"<B{len(context.shape)}I", len(context.shape), *context.shape)
    ids = struct.pack(f"<B{len(context.codec_ids)}H", len(context.codec_ids), *context.codec_ids)
    return b"".join(
        (
            _AAD_TAG,
            context.key,
            context.dtype.encode(),
            b"\0",
            shape,
            bytes([context.mla]),
            ids,
            prefix,
        )
    )


class AesGcmCodec(ByteCodec):
    """AES-GCM encryption with a key from a ``KeyRing``: authenticated, so a wrong key is a miss.

    Built from a spec without a key ring it only checks syntax (config
    validation); ``bind`` attaches the ring and checks the key id is in it.
    """

    id = 8
    name = "aesgcm"
    cipher: ClassVar[bool] = True

    def __init__(self, key_id: str = DEFAULT_KEY_ID, keys: KeyRing | None = None) -> None:
        self.key_id = check_key_id(key_id)
        self.keys = keys

    def bind(self, keys: KeyRing) -> AesGcmCodec:
        """This codec with ``keys``; ConfigError if they hold no key of its key id."""
        if self.key_id not in keys:
            raise ConfigError(
                f"no encryption key with id {self.key_id!r} (known: {list(keys.ids)}): set it in "
                f"the config's encryption_keys, {ENV_KEY} (id 'default') or {ENV_KEYS}"
            )
        return AesGcmCodec(self.key_id, keys)

    def spec(self) -> str:
        return self.name if self.key_id == DEFAULT_KEY_ID else f"{self.name}:{self.key_id}"

    def encode(self, data: memoryview, context: ChunkContext) -> Buffer:
        cipher = self.keys.cipher(self.key_id) if self.keys is not None else None
        if cipher is None:
            raise ConfigError(f"codec {self.spec()!r} has no key to encrypt with")
        key_id = self.key_id.encode()
        prefix = bytes((_FRAME_VERSION, len(key_id))) + key_id
        nonce = os.urandom(NONCE_BYTES)
        return prefix + nonce + cipher.encrypt(nonce, data, _aad(context, prefix))

    def decode(self, data: memoryview, context: ChunkContext) -> Buffer:
        if len(data) < 2 or data[0] != _FRAME_VERSION:
            raise IntegrityError("aesgcm payload has no valid frame")
        start = 2 + data[1]
        key_id = bytes(data[2:start]).decode("ascii", errors="replace")
        if len(data) < start + NONCE_BYTES + 16:
            raise IntegrityError("aesgcm payload is truncated")
        cipher = self.keys.cipher(key_id) if self.keys is not None else None
        if cipher is None:
            raise IntegrityError(f"no encryption key with id {key_id!r} to decrypt this chunk")
        from cryptography.exceptions import InvalidTag

        nonce = data[start : start + NONCE_BYTES]
        try:
            return cipher.decrypt(
                nonce, data[start + NONCE_BYTES :], _aad(context, bytes(data[:start]))
            )
        except InvalidTag:
            raise IntegrityError(
                f"chunk does not authenticate with encryption key {key_id!r} "
                "(a different key of that id, or tampered bytes)"
            ) from None
