"""The key-service interface (`KmsProvider`), its metadata types, its errors, and the framing of
wrapped data keys shared by every provider.

Only what a caller of any provider needs belongs here: a local keyring (kvstore/kms/local.py) and
a remote KMS (AWS KMS, Vault transit) both implement `KmsProvider`; the envelope code
(kvstore/kms/envelope.py) depends on nothing else.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import msgpack

from kvstore.errors import DataLoss, Internal, InvalidArgument, PermissionDenied

#: Encryption context: non-secret names bound into every wrapped data key (AWS KMS semantics).
#: Unwrapping with a different context fails, so a data key cannot be reused out of its purpose.
EncryptionContext = Mapping[str, str]

WRAPPED_FORMAT = 1
ALIAS_PREFIX = "alias/"
_ALIAS_RE = re.compile(r"alias/[A-Za-z0-9/_-]{1,250}")
MIN_DELETION_DAYS = 7    # AWS KMS bounds: long enough to notice a mistake, short enough to shred
MAX_DELETION_DAYS = 30
DEK_BYTES = 32           # AES-256


# --------------------------------------------------------------------------------------- errors
# Subclasses of the kvstore.errors classes, so each travels as its parent's status code and
# clients catch the parent. Who must act is in the docstring and in every message.


class KeyNotFound(InvalidArgument):
    """No KEK with that id or alias in this key service. Fix the id, or import the key."""


class KeyUnusable(PermissionDenied):
    """The KEK (or the needed version of it) is disabled or pending deletion, or this node's
    keyring does not hold it. An operator must enable it, cancel the deletion, or import it.

    PERMISSION_DENIED rather than FAILED_PRECONDITION: in this codebase FAILED_PRECONDITION means
    StaleContext ("read again and retry"), and a client that retried here would spin; the data is
    unreadable because an operator said so, which is a refusal, not a transient state.
    """


class KeyDestroyed(DataLoss):
    """The KEK's material was purged after its deletion window (crypto-shredding): everything
    sealed under it is unrecoverable. DATA_LOSS, but distinct from corruption: another replica
    cannot repair it, because every replica was sealed under the same key."""


class KeyringError(Internal):
    """The keyring cannot be opened or saved (missing, corrupt, unsupported format, I/O error).
    At startup the node refuses to start with this message; an operator must fix the file."""


class RootKeyError(KeyringError):
    """The root key that seals the keyring is missing, malformed, badly protected (file mode), or
    does not open this keyring. The message names the source (env var or file) at fault."""


# ------------------------------------------------------------------------------------ metadata


class KeyState(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    DESTROYED = "Destroyed"     # material purged; the id stays so errors can say what happened


class VersionState(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"


@dataclass(frozen=True)
class KeyVersionInfo:
    version: int
    state: VersionState
    created_at: float            # unix seconds


@dataclass(frozen=True)
class KeyMetadata:
    """A KEK as a caller sees it: never its material."""

    key_id: str
    aliases: tuple[str, ...]
    description: str
    state: KeyState
    created_at: float                    # unix seconds
    primary_version: int                 # the version new data keys and rewraps use
    versions: tuple[KeyVersionInfo, ...]
    deletion_at: float | None = None     # unix seconds, when state is PendingDeletion


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: use `plaintext` in memory only, store `wrapped` next to the data."""

    plaintext: bytes = field(repr=False)  # never in a repr, log line or traceback
    wrapped: bytes
    kek_id: str
    kek_version: int


# ----------------------------------------------------------------------------------- interface


@runtime_checkable
class KmsProvider(Protocol):
    """A KMS-style key service holding key-encryption keys (KEKs) by id and alias.

    Every method that takes `kek_id` also accepts an alias ("alias/name"). Errors: KeyNotFound
    (unknown id), KeyUnusable (disabled, pending deletion, version disabled), KeyDestroyed
    (purged), DataLoss (a wrapped key that does not authenticate), InvalidArgument (bad input or a
    state change the key's state does not allow; the message says which).
    """

    def generate_data_key(self, kek_id: str, context: EncryptionContext) -> DataKey:
        """A new random 256-bit data key wrapped under the KEK's primary version."""

    def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        """The plaintext of a wrapped data key; `context` must equal the one it was made with."""

    def rewrap(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        """The same data key wrapped under the KEK's primary version (unchanged bytes if it
        already is). The data sealed under the data key is not touched."""

    def create_key(self, alias: str | None = None, description: str = "") -> KeyMetadata: ...

    def rotate(self, kek_id: str, make_primary: bool = True) -> KeyMetadata:
        """Add a version. make_primary=False stages it (decryptable, not yet used to wrap) so
        every node of a cluster can import it before any node wraps under it."""

    def set_primary_version(self, kek_id: str, version: int) -> KeyMetadata: ...

    def describe(self, kek_id_or_alias: str) -> KeyMetadata: ...

    def list_keys(self) -> list[KeyMetadata]: ...

    def enable(self, kek_id: str) -> KeyMetadata: ...

    def disable(self, kek_id: str) -> KeyMetadata: ...

    def enable_version(self, kek_id: str, version: int) -> KeyMetadata: ...

    def disable_version(self, kek_id: str, version: int) -> KeyMetadata: ...

    def schedule_deletion(self, kek_id: str, days: int, now: float | None = None) -> KeyMetadata:
        """PendingDeletion for `days` (7..30): unusable at once, destroyed by purge_deleted."""

    def cancel_deletion(self, kek_id: str) -> KeyMetadata:
        """Back to Disabled (as AWS KMS does): enabling it again is a separate, deliberate act."""

    def purge_deleted(self, now: float | None = None) -> list[str]:
        """Destroy the material of every key whose deletion date has passed; their ids."""

    def set_alias(self, alias: str, kek_id: str) -> KeyMetadata: ...

    def delete_alias(self, alias: str) -> None: ...


# ------------------------------------------------------------------------- shared wire formats


def encode_context(context: EncryptionContext) -> bytes:
    """Canonical bytes of an encryption context (order-independent), for use as AAD."""
    items = sorted(context.items())
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgument("encryption context: names and values must be strings")
    return msgpack.packb(items, use_bin_type=True)


def pack_wrapped(kek_id: str, kek_version: int, blob: bytes) -> bytes:
    """Frame a provider's wrapped-key blob with the KEK id and version it is under.

    The framing is common to all providers so the envelope can check its header against the
    wrapped key and the re-wrapper can tell stale envelopes without calling the provider. The
    blob stays provider-specific (AES-GCM here, a CiphertextBlob for AWS KMS); each provider must
    authenticate the id and version it was given (LocalKms binds both into its AAD).
    """
    return msgpack.packb([WRAPPED_FORMAT, kek_id, kek_version, blob], use_bin_type=True)


def unpack_wrapped(wrapped: Any) -> tuple[str, int, bytes]:
    """(kek_id, kek_version, blob) of a wrapped data key; DataLoss if malformed."""
    try:
        doc = msgpack.unpackb(wrapped, raw=False, use_list=True) if isinstance(wrapped, bytes) else None
    except (ValueError, TypeError, msgpack.UnpackException):
        doc = None
    if not isinstance(doc, list) or len(doc) != 4:
        raise DataLoss("wrapped data key is malformed (not a [format, kek id, version, blob] array)")
    fmt, kek_id, version, blob = doc
    if fmt != WRAPPED_FORMAT:
        raise DataLoss(f"wrapped data key has unknown format {fmt!r} (this node reads {WRAPPED_FORMAT})")
    if not isinstance(kek_id, str) or not isinstance(version, int) or version < 1 or not isinstance(blob, bytes):
        raise DataLoss("wrapped data key is malformed (bad kek id, version or blob)")
    return kek_id, version, blob


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise InvalidArgument(
            f"alias {alias!r}: must be 'alias/' followed by 1..250 of A-Z a-z 0-9 / _ -"
        )
    return alias


def check_deletion_days(days: Any) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
        raise InvalidArgument(
            f"deletion window: days must be an integer in {MIN_DELETION_DAYS}..{MAX_DELETION_DAYS}, got {days!r}"
        )
    return days

