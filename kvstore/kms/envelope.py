"""The value envelope: sealing values at rest under cached data keys, and re-wrapping envelopes.

What belongs here: the envelope byte format, `Sealer` (data-key lifecycle and cache, seal/open),
`NullSealer` (plaintext, for benchmarks and tests), and `rewrap_envelope`. Key storage and key
states belong to the provider (kvstore/kms/provider.py); this module never sees a KEK.

Envelope, msgpack, versioned from the first commit:
    [ENVELOPE_FORMAT=1, kek_id, kek_version, wrapped_dek, nonce(12), ciphertext+tag]
    [PLAINTEXT_FORMAT=0, plaintext]                      (NullSealer only)

The value's AAD is [label, format, kek_id] followed by the caller's AAD (the node passes the key
and sibling dot), so a value moved to another key, or an envelope swapped with another, fails to
open. kek_version and wrapped_dek are deliberately not in the value's AAD: re-wrapping changes
them without re-encrypting the value. They are authenticated another way: the wrapped DEK by the
provider (its AEAD binds KEK id and version), and the header by being checked against the wrapped
DEK's framing; a wrapped DEK swapped for another yields a different DEK, and the value's tag fails.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, MutableMapping

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvstore.errors import DataLoss, KvError
from kvstore.kms.provider import EncryptionContext, KeyState, KmsProvider, unpack_wrapped
from kvstore.packing import packb

ENVELOPE_FORMAT = 1
PLAINTEXT_FORMAT = 0     # distinct from every sealed format, so neither sealer misreads the other
NONCE_BYTES = 12
TAG_BYTES = 16
_AAD_LABEL = "kvstore value"

#: The encryption context every value data key is wrapped with: a DEK made for values cannot be
#: unwrapped for another purpose (say, a future hint-file key) under the same KEK.
DEFAULT_CONTEXT: EncryptionContext = MappingProxyType({"purpose": "kvstore value"})


@dataclass(frozen=True)
class SealerConfig:
    # 24 h bounds how much data one leaked DEK exposes, at one KMS call a day per node.
    max_dek_age_s: float = 24 * 3600.0
    # 2^24 encryptions per DEK: random 96-bit nonces stay safe to 2^32 per key (NIST SP 800-38D),
    # so this leaves a factor of 256, and costs one KMS call per 16M writes.
    max_dek_uses: int = 2**24
    # Unwrapped DEKs kept in memory. Every node reads envelopes sealed by every node (about one
    # DEK per node per day), so 1024 covers years of a mid-sized cluster; a miss is one KMS call.
    dek_cache_size: int = 1024
    # How stale a cached DEK's view of its KEK may get: disabling, deleting or rotating a KEK
    # takes effect on a node within this long (at once after Sealer.clear_cache()).
    key_check_interval_s: float = 60.0

    def validate(self) -> "SealerConfig":
        if not self.max_dek_age_s > 0:
            raise ValueError(f"max_dek_age_s: must be > 0, got {self.max_dek_age_s}")
        if not 1 <= self.max_dek_uses <= 2**32:
            raise ValueError(f"max_dek_uses: must be in 1..2^32 (the random-nonce limit), got {self.max_dek_uses}")
        if self.dek_cache_size < 1:
            raise ValueError(f"dek_cache_size: must be >= 1, got {self.dek_cache_size}")
        if not self.key_check_interval_s > 0:
            raise ValueError(f"key_check_interval_s: must be > 0, got {self.key_check_interval_s}")
        return self


@dataclass
class SealerStats:
    seals: int = 0
    opens: int = 0
    dek_rotations: int = 0    # current DEK replaced (by age, use count, KEK change or clear_cache)
    cache_hits: int = 0       # opens served by an in-memory DEK
    cache_misses: int = 0     # opens that asked the provider to unwrap


@dataclass
class _Dek:
    cipher: AESGCM = field(repr=False)
    kek_id: str
    kek_version: int
    wrapped: bytes
    checked_at: float         # clock time the provider last vouched for it


@dataclass
class _CurrentDek:
    dek: _Dek
    created_at: float
    uses: int = 0


def _aad(kek_id: str, aad: bytes) -> bytes:
    # A msgpack array is self-delimiting, so prefix + caller AAD is an unambiguous encoding.
    prefix = _AAD_PREFIXES.get(kek_id)
    if prefix is None:  # one per KEK id: built once, not per value
        prefix = msgpack.packb([_AAD_LABEL, ENVELOPE_FORMAT, kek_id], use_bin_type=True)
        if len(_AAD_PREFIXES) < 1024:
            _AAD_PREFIXES[kek_id] = prefix
    return prefix + aad


_AAD_PREFIXES: dict[str, bytes] = {}


def _where(key_for_errors: bytes | None) -> str:
    return "sealed value" if key_for_errors is None else f"key {key_for_errors[:64]!r}"


def _parse(envelope: Any, key_for_errors: bytes | None) -> list:
    """The fields of an envelope of any known format; DataLoss naming the key otherwise."""
    try:
        doc = msgpack.unpackb(envelope, raw=False, use_list=True) if isinstance(envelope, bytes) else None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        doc = None
    if not isinstance(doc, list) or not doc:
        raise DataLoss(f"{_where(key_for_errors)}: the envelope is malformed (not a msgpack array)")
    fmt = doc[0]
    if type(fmt) is int and fmt == PLAINTEXT_FORMAT:  # `type is`: False and 1.0 are not formats
        if len(doc) != 2 or not isinstance(doc[1], bytes):
            raise DataLoss(f"{_where(key_for_errors)}: the plaintext envelope is malformed")
        return doc
    if type(fmt) is not int or fmt != ENVELOPE_FORMAT:
        raise DataLoss(
            f"{_where(key_for_errors)}: unknown envelope format {fmt!r} (this node reads {ENVELOPE_FORMAT} and {PLAINTEXT_FORMAT})"
        )
    if len(doc) != 6:
        raise DataLoss(f"{_where(key_for_errors)}: the envelope has {len(doc)} fields, format {ENVELOPE_FORMAT} has 6")
    _, kek_id, version, wrapped, nonce, ciphertext = doc
    if not isinstance(kek_id, str) or not isinstance(version, int) or isinstance(version, bool) or version < 1 \
            or not isinstance(wrapped, bytes) or not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES \
            or not isinstance(ciphertext, bytes) or len(ciphertext) < TAG_BYTES:
        raise DataLoss(f"{_where(key_for_errors)}: the envelope header is malformed")
    return doc


def _named(exc: KvError, key_for_errors: bytes | None) -> KvError:
    """The same error class (so status codes and handlers still match), naming the value's key."""
    return type(exc)(f"{_where(key_for_errors)}: {exc}")


class Sealer:
    """Seals values under data keys from `provider` for KEK `kek_id` (an id or alias).

    Thread-safe. Plaintext DEKs live in memory only: the current (sealing) DEK, rotated by age and
    use count, and a bounded LRU of unwrapped DEKs keyed by their wrapped bytes. `clock` is
    monotonic seconds; tests inject a fake one.
    """

    def __init__(
        self,
        provider: KmsProvider,
        kek_id: str,
        config: SealerConfig = SealerConfig(),
        *,
        context: EncryptionContext = DEFAULT_CONTEXT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.kek_id = kek_id
        self.config = config.validate()
        self.context = context
        self.stats = SealerStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _CurrentDek | None = None
        self._cache: OrderedDict[bytes, _Dek] = OrderedDict()
        self._rewrap_lock = threading.Lock()
        self._rewrap_memo: OrderedDict[bytes, bytes] = OrderedDict()

    # ------------------------------------------------------------------------------- sealing

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        with self._lock:
            dek = self._sealing_dek(self._clock())
        nonce = os.urandom(NONCE_BYTES)  # what secrets.token_bytes returns, without its two calls
        ciphertext = dek.cipher.encrypt(nonce, plaintext, _aad(dek.kek_id, aad))
        return packb([ENVELOPE_FORMAT, dek.kek_id, dek.kek_version, dek.wrapped, nonce, ciphertext])

    def _sealing_dek(self, now: float) -> _Dek:
        current = had = self._current
        if current is not None and now - current.dek.checked_at >= self.config.key_check_interval_s:
            current = self._recheck(current, now)
        if current is None or current.uses >= self.config.max_dek_uses \
                or now - current.created_at >= self.config.max_dek_age_s:
            current = self._new_dek(now, replacing=had is not None)
        current.uses += 1
        self.stats.seals += 1
        return current.dek

    def _recheck(self, current: _CurrentDek, now: float) -> _CurrentDek | None:
        """Keep the current DEK only while its KEK is enabled and its version still primary (or
        the alias still names it): None means make a new one, which raises if the KEK is unusable."""
        meta = self.provider.describe(self.kek_id)
        if meta.state != KeyState.ENABLED or meta.key_id != current.dek.kek_id \
                or meta.primary_version != current.dek.kek_version:
            self._current = None
            return None
        current.dek.checked_at = now
        return current

    def _new_dek(self, now: float, replacing: bool) -> _CurrentDek:
        self._current = None  # if the provider refuses, never fall back to the old DEK
        data_key = self.provider.generate_data_key(self.kek_id, self.context)
        dek = _Dek(AESGCM(data_key.plaintext), data_key.kek_id, data_key.kek_version, data_key.wrapped, now)
        self._remember(dek)  # so this node opens its own writes without a provider call
        self._current = _CurrentDek(dek, now)
        if replacing:
            self.stats.dek_rotations += 1
        return self._current

    # ------------------------------------------------------------------------------- opening

    def open(self, envelope: bytes, aad: bytes, key_for_errors: bytes | None = None) -> bytes:
        """The plaintext of `envelope`, sealed with the same `aad`. DataLoss (naming
        `key_for_errors`) if it is malformed, of an unknown format, or does not authenticate;
        KeyUnusable / KeyDestroyed if its KEK is disabled or deleted."""
        doc = _parse(envelope, key_for_errors)
        if doc[0] == PLAINTEXT_FORMAT:
            raise DataLoss(f"{_where(key_for_errors)}: stored in plaintext (format 0) but encryption at rest is on")
        _, kek_id, version, wrapped, nonce, ciphertext = doc
        dek = self._unwrapped(wrapped, kek_id, version, self._clock(), key_for_errors)
        try:
            return dek.cipher.decrypt(nonce, ciphertext, _aad(kek_id, aad))
        except InvalidTag:
            raise DataLoss(
                f"{_where(key_for_errors)}: the sealed value did not authenticate: it was altered, "
                "or it belongs to another key or version"
            ) from None

    def _unwrapped(self, wrapped: bytes, kek_id: str, version: int, now: float,
                   key_for_errors: bytes | None) -> _Dek:
        """The DEK of `wrapped`, which the envelope header says is under KEK `kek_id` v`version`."""
        with self._lock:
            self.stats.opens += 1
            dek = self._cache.get(wrapped)
            if dek is not None and now - dek.checked_at < self.config.key_check_interval_s:
                self._cache.move_to_end(wrapped)
                self.stats.cache_hits += 1
                self._check_header(dek.kek_id, dek.kek_version, kek_id, version, key_for_errors)
                return dek
            # A miss, or an entry due for a check: unwrapping again asks the provider whether the
            # KEK and version are still usable, so disabling a KEK reaches cached DEKs too.
            self._cache.pop(wrapped, None)
            self.stats.cache_misses += 1
        try:
            wrapped_kek_id, wrapped_version, _ = unpack_wrapped(wrapped)
        except KvError as exc:
            raise _named(exc, key_for_errors) from None
        # Before asking the provider: an altered header or framing is corruption (DataLoss), not
        # "this keyring lacks that KEK or version" (KeyUnusable).
        self._check_header(wrapped_kek_id, wrapped_version, kek_id, version, key_for_errors)
        try:  # outside the lock: a remote provider's round trip must not stall other threads
            plaintext = self.provider.decrypt_data_key(wrapped, self.context)
        except KvError as exc:
            raise _named(exc, key_for_errors) from None
        dek = _Dek(AESGCM(plaintext), kek_id, version, wrapped, now)
        with self._lock:
            self._remember(dek)
        return dek

    @staticmethod
    def _check_header(wrapped_kek_id: str, wrapped_version: int, kek_id: str, version: int,
                      key_for_errors: bytes | None) -> None:
        if (wrapped_kek_id, wrapped_version) != (kek_id, version):
            raise DataLoss(
                f"{_where(key_for_errors)}: the envelope header says KEK {kek_id} v{version} but its data "
                f"key is wrapped under {wrapped_kek_id} v{wrapped_version}: the envelope was altered"
            )

    def _remember(self, dek: _Dek) -> None:
        self._cache[dek.wrapped] = dek
        self._cache.move_to_end(dek.wrapped)
        while len(self._cache) > self.config.dek_cache_size:
            self._cache.popitem(last=False)

    # -------------------------------------------------------------------------- maintenance

    def clear_cache(self) -> None:
        """Forget every plaintext DEK (the node calls this after changing a KEK's state, so the
        change applies at once rather than within key_check_interval_s)."""
        with self._lock:
            if self._current is not None:
                self.stats.dek_rotations += 1
            self._current = None
            self._cache.clear()
        with self._rewrap_lock:
            self._rewrap_memo.clear()

    def cached_deks(self) -> int:
        with self._lock:
            return len(self._cache)

    def rewrap(self, envelope: bytes) -> bytes | None:
        """rewrap_envelope with this sealer's provider and context, and a bounded memo so all the
        envelopes sharing a DEK get one new wrapped DEK (and one provider call)."""
        # Its own lock: a re-wrap pass may wait on the provider without holding up seal and open.
        with self._rewrap_lock:
            result = rewrap_envelope(envelope, self.provider, context=self.context, memo=self._rewrap_memo)
            while len(self._rewrap_memo) > self.config.dek_cache_size:
                self._rewrap_memo.popitem(last=False)
            return result


def rewrap_envelope(
    envelope: bytes,
    provider: KmsProvider,
    *,
    context: EncryptionContext = DEFAULT_CONTEXT,
    memo: MutableMapping[bytes, bytes] | None = None,
) -> bytes | None:
    """`envelope` with its DEK re-wrapped under the KEK's primary version, or None if it already
    is (or holds plaintext). The value's nonce and ciphertext are copied, never decrypted.

    `memo` (old wrapped DEK -> new) saves a provider call per envelope sharing a DEK; use a fresh
    one per re-wrap pass, since an entry goes stale when the primary version changes again.
    """
    doc = _parse(envelope, None)
    if doc[0] == PLAINTEXT_FORMAT:
        return None
    _, kek_id, version, wrapped, nonce, ciphertext = doc
    new_wrapped = memo.get(wrapped) if memo is not None else None
    if new_wrapped is None:
        new_wrapped = provider.rewrap(wrapped, context)
        if memo is not None:
            memo[wrapped] = new_wrapped
    if new_wrapped == wrapped:
        return None
    new_kek_id, new_version, _ = unpack_wrapped(new_wrapped)
    if new_kek_id != kek_id:  # rewrap keeps the KEK; the value's AAD binds its id
        raise DataLoss(f"rewrap moved a data key from KEK {kek_id} to {new_kek_id}: refusing")
    return msgpack.packb(
        [ENVELOPE_FORMAT, kek_id, new_version, new_wrapped, nonce, ciphertext], use_bin_type=True
    )


class NullSealer:
    """Same interface as Sealer, storing plaintext: the baseline of benchmarks, and tests that do
    not care about encryption. Its format differs, so neither sealer mistakes the other's bytes."""

    def __init__(self) -> None:
        self.stats = SealerStats()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self.stats.seals += 1
        return packb([PLAINTEXT_FORMAT, plaintext])

    def open(self, envelope: bytes, aad: bytes, key_for_errors: bytes | None = None) -> bytes:
        self.stats.opens += 1
        doc = _parse(envelope, key_for_errors)
        if doc[0] != PLAINTEXT_FORMAT:
            raise DataLoss(
                f"{_where(key_for_errors)}: sealed (format {doc[0]}) but this node runs without encryption "
                "at rest: configure its KMS"
            )
        return doc[1]

    def clear_cache(self) -> None:
        pass

    def cached_deks(self) -> int:
        return 0

    def rewrap(self, envelope: bytes) -> bytes | None:
        return None
