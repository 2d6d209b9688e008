"""The local key service: KEKs in a keyring file sealed by a root key, and root-key discovery.

What belongs here: the keyring's file format and state machine (key and version states, aliases,
deletion windows, purge), wrapping of data keys, and moving a KEK between nodes (export/import).

Files. The keyring is a versioned msgpack file, sealed with AES-256-GCM under a key derived from
the root key, written atomically (tmp + fsync + rename + fsync dir) with mode 0600. Changes take
an flock on "<keyring>.lock" and first reload the file if another process (the CLI) changed it.
The root key comes from KVSTORE_ROOT_KEY or a 0600 key file, never from the data directory.

Sharing a KEK across a cluster: every node of a cluster holds the same root key (the cluster's one
secret) and its own copy of the keyring. `export_key` seals one KEK (all its versions) under that
root key, so the blob may travel through any channel (CLI, admin RPC, a file); `import_key` on
another node adds the key, or the versions it lacks. Bootstrapping can equally copy the whole
keyring file. A per-node root key plus a transfer key would add a secret without adding protection:
whoever holds any node's root key can read the KEK from that node's keyring anyway.
"""
from __future__ import annotations

import binascii
import fcntl
import hmac
import os
import secrets
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvstore.errors import DataLoss, InvalidArgument
from kvstore.kms.provider import (
    ALIAS_PREFIX,
    DEK_BYTES,
    DataKey,
    EncryptionContext,
    KeyDestroyed,
    KeyMetadata,
    KeyNotFound,
    KeyringError,
    KeyState,
    KeyUnusable,
    KeyVersionInfo,
    RootKeyError,
    VersionState,
    check_alias,
    check_deletion_days,
    encode_context,
    pack_wrapped,
    unpack_wrapped,
)

ROOT_KEY_ENV = "KVSTORE_ROOT_KEY"
ROOT_KEY_BYTES = 32
KEYRING_FILE_FORMAT = 1   # the sealed container: [format, root fingerprint, nonce, ciphertext]
KEYRING_FORMAT = 1        # the plaintext inside it: {"format", "keys", "aliases"}
EXPORT_FORMAT = 1         # export blobs: same container shape, a different derived key
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_DESCRIPTION_CHARS = 1024
_DAY_S = 86400.0

# HKDF labels: one root key serves several purposes, each under its own derived key, so a blob of
# one kind can never be opened as another.
_SEAL_INFO = b"kvstore-kms keyring seal v1"
_EXPORT_INFO = b"kvstore-kms key export v1"
_FINGERPRINT_INFO = b"kvstore-kms root key fingerprint v1"
_WRAP_INFO = b"kvstore-kms wrap v1"


def _hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ------------------------------------------------------------------------------------ root key


@dataclass(frozen=True)
class RootKey:
    """The secret that seals a keyring; `source` names where it came from, for error messages."""

    material: bytes = field(repr=False)
    source: str

    @property
    def fingerprint(self) -> str:
        """Short public id of the root key (an HKDF output): lets an error say "wrong root key"
        instead of "corrupt file", and an operator check two nodes share one root key."""
        return _hkdf(self.material, _FINGERPRINT_INFO, 8).hex()


def generate_root_key() -> str:
    """A new root key as the base64 text KVSTORE_ROOT_KEY and key files hold."""
    return binascii.b2a_base64(secrets.token_bytes(ROOT_KEY_BYTES), newline=False).decode()


def _decode_root_key(text: str, source: str) -> RootKey:
    try:
        material = binascii.a2b_base64(text.strip(), strict_mode=True)
    except binascii.Error:
        raise RootKeyError(f"root key from {source} is not valid base64") from None
    if len(material) != ROOT_KEY_BYTES:
        raise RootKeyError(
            f"root key from {source} is {len(material)} bytes: it must be base64 of {ROOT_KEY_BYTES} random bytes"
        )
    return RootKey(material, source)


def _is_inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def load_root_key(
    key_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> RootKey:
    """The root key from $KVSTORE_ROOT_KEY or from `key_file` (exactly one of them).

    Raises RootKeyError naming what is missing or wrong: neither or both given, bad base64 or
    length, a key file that is missing, not a regular file, readable by group or others, or
    inside `data_dir` (a copy of the data directory must never carry the key that opens it).
    """
    env = os.environ if environ is None else environ
    from_env = env.get(ROOT_KEY_ENV)
    if from_env is not None and key_file is not None:
        raise RootKeyError(
            f"root key given twice: ${ROOT_KEY_ENV} is set and root key file {key_file} is configured; use one"
        )
    if from_env is not None:
        return _decode_root_key(from_env, f"${ROOT_KEY_ENV}")
    if key_file is None:
        raise RootKeyError(
            f"no root key: set ${ROOT_KEY_ENV} to base64 of {ROOT_KEY_BYTES} random bytes "
            "(e.g. `head -c 32 /dev/urandom | base64`) or configure a root key file with mode 0600"
        )
    key_file = Path(key_file)
    if data_dir is not None and _is_inside(key_file, data_dir):
        raise RootKeyError(f"root key file {key_file} is inside the data directory {data_dir}: move it out")
    try:
        # O_NOFOLLOW-free on purpose: a symlink to a 0600 file in a secrets mount is common; the
        # mode check below applies to the target, which is what a reader would get.
        fd = os.open(key_file, os.O_RDONLY)
    except FileNotFoundError:
        raise RootKeyError(f"root key file {key_file} does not exist") from None
    except OSError as exc:
        raise RootKeyError(f"root key file {key_file} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the opened file's mode, so a swap between check and read is moot
        if not stat.S_ISREG(st.st_mode):
            raise RootKeyError(f"root key file {key_file} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o177:
            raise RootKeyError(
                f"root key file {key_file} has mode {mode:04o}: it must be 0600 (owner read/write only); "
                f"run chmod 600 {key_file}"
            )
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        return _decode_root_key(text.decode("ascii"), f"root key file {key_file}")
    except UnicodeDecodeError:
        raise RootKeyError(f"root key file {key_file} must hold base64 text") from None


# ---------------------------------------------------------------------------- sealed containers


def _seal_container(fmt: int, root: RootKey, info: bytes, payload: bytes) -> bytes:
    fingerprint = root.fingerprint
    nonce = secrets.token_bytes(NONCE_BYTES)
    aad = _packb([info, fmt, fingerprint])
    ciphertext = AESGCM(_hkdf(root.material, info)).encrypt(nonce, payload, aad)
    return _packb([fmt, fingerprint, nonce, ciphertext])


def _open_container(
    data: bytes, fmt: int, root: RootKey, info: bytes, what: str,
    malformed: type[Exception], wrong_root: type[Exception],
) -> bytes:
    try:
        doc = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        doc = None
    if not isinstance(doc, list) or len(doc) != 4:
        raise malformed(f"{what} is not a kvstore keyring container")
    found_fmt, fingerprint, nonce, ciphertext = doc
    if found_fmt != fmt:
        raise malformed(f"{what} has unknown format {found_fmt!r} (this version reads {fmt})")
    if not isinstance(fingerprint, str) or not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES \
            or not isinstance(ciphertext, bytes) or len(ciphertext) < TAG_BYTES:
        raise malformed(f"{what} is malformed")
    if not hmac.compare_digest(fingerprint, root.fingerprint):
        raise wrong_root(
            f"wrong root key: {what} was sealed by root key {fingerprint}, "
            f"but {root.source} holds root key {root.fingerprint}"
        )
    try:
        return AESGCM(_hkdf(root.material, info)).decrypt(nonce, ciphertext, _packb([info, fmt, fingerprint]))
    except InvalidTag:
        raise malformed(f"{what} did not authenticate under the root key: it is corrupt or was altered") from None


# --------------------------------------------------------------------------------- keyring model


@dataclass
class _Version:
    version: int
    state: VersionState
    created_at: float
    material: bytes | None = field(repr=False)   # None once destroyed


@dataclass
class _Key:
    key_id: str
    description: str
    state: KeyState
    created_at: float
    primary: int
    versions: dict[int, _Version]
    deletion_at: float | None = None


def _key_to_doc(key: _Key) -> dict[str, Any]:
    return {
        "id": key.key_id, "description": key.description, "state": str(key.state),
        "created_at": key.created_at, "primary": key.primary, "deletion_at": key.deletion_at,
        "versions": [
            {"version": v.version, "state": str(v.state), "created_at": v.created_at, "material": v.material}
            for v in key.versions.values()
        ],
    }


def _key_from_doc(doc: Any) -> _Key:
    """Decode one key; raises ValueError/KeyError/TypeError on any malformed field."""
    versions: dict[int, _Version] = {}
    for v in doc["versions"]:
        material = v["material"]
        if material is not None and (not isinstance(material, bytes) or len(material) != 32):
            raise ValueError("key material must be 32 bytes")
        if not isinstance(v["version"], int) or v["version"] < 1 or v["version"] in versions:
            raise ValueError("versions must be distinct positive integers")
        versions[v["version"]] = _Version(v["version"], VersionState(v["state"]), float(v["created_at"]), material)
    key = _Key(
        key_id=doc["id"], description=doc["description"], state=KeyState(doc["state"]),
        created_at=float(doc["created_at"]), primary=doc["primary"], versions=versions,
        deletion_at=None if doc["deletion_at"] is None else float(doc["deletion_at"]),
    )
    if not isinstance(key.key_id, str) or not key.key_id or not isinstance(key.description, str):
        raise ValueError("key id and description must be strings")
    if key.primary not in versions:
        raise ValueError(f"key {key.key_id}: primary version {key.primary} does not exist")
    if (key.state == KeyState.PENDING_DELETION) != (key.deletion_at is not None):
        raise ValueError(f"key {key.key_id}: a deletion date goes with PendingDeletion only")
    if (key.state == KeyState.DESTROYED) != any(v.material is None for v in versions.values()):
        raise ValueError(f"key {key.key_id}: material is absent exactly when the key is Destroyed")
    return key


def _metadata(key: _Key, aliases: Mapping[str, str]) -> KeyMetadata:
    return KeyMetadata(
        key_id=key.key_id,
        aliases=tuple(sorted(a for a, k in aliases.items() if k == key.key_id)),
        description=key.description,
        state=key.state,
        created_at=key.created_at,
        primary_version=key.primary,
        versions=tuple(KeyVersionInfo(v.version, v.state, v.created_at) for v in sorted(
            key.versions.values(), key=lambda v: v.version)),
        deletion_at=key.deletion_at,
    )


def _wrap_aad(key_id: str, version: int, context: EncryptionContext) -> bytes:
    # Binds the KEK id and version (so a blob relabelled as another key or version fails) and the
    # caller's context (so a data key cannot be unwrapped for another purpose).
    return _packb([_WRAP_INFO, key_id, version, encode_context(context)])


# ------------------------------------------------------------------------------------ LocalKms


class LocalKms:
    """KmsProvider over a keyring file. Thread-safe (the storage writer may seal in a thread).

    Create with `LocalKms.create(path, root_key)` once, then `LocalKms.open(path, root_key)`.
    Changes made by another process (the CLI) are seen by the next change made here, or at once
    with `reload()`; the hot path (generate, decrypt) reads memory only.
    """

    def __init__(self, path: Path, root_key: RootKey, clock: Callable[[], float]) -> None:
        self.path = Path(path)
        self.root_key = root_key
        self._clock = clock  # unix seconds: creation and deletion dates are calendar dates
        self._lock = threading.RLock()
        self._keys: dict[str, _Key] = {}
        self._aliases: dict[str, str] = {}
        self._wrappers: dict[tuple[str, int], AESGCM] = {}
        self._file_id: tuple[int, int, int] | None = None

    # ----------------------------------------------------------------- opening and persistence

    @classmethod
    def create(cls, path: Path, root_key: RootKey, *, data_dir: Path | None = None,
               clock: Callable[[], float] = time.time) -> "LocalKms":
        """A new, empty keyring at `path` (which must not exist)."""
        kms = cls(path, root_key, clock)
        kms._check_location(data_dir)
        with kms._lock, kms._file_lock():
            if kms.path.exists():
                raise KeyringError(f"keyring {kms.path} already exists: open it instead")
            kms._save()
        return kms

    @classmethod
    def open(cls, path: Path, root_key: RootKey, *, data_dir: Path | None = None,
             clock: Callable[[], float] = time.time) -> "LocalKms":
        """The keyring at `path`. KeyringError if missing or corrupt, RootKeyError if `root_key`
        is not the one that sealed it: the node turns either into a refusal to start."""
        kms = cls(path, root_key, clock)
        kms._check_location(data_dir)
        kms.reload()
        return kms

    def _check_location(self, data_dir: Path | None) -> None:
        if data_dir is not None and _is_inside(self.path, data_dir):
            raise KeyringError(
                f"keyring {self.path} is inside the data directory {data_dir}: keep it outside, so "
                "a copy of the data never carries the keys that open it"
            )

    def reload(self) -> None:
        """Read the keyring file again (after another process changed it)."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise KeyringError(
                    f"keyring {self.path} does not exist: create it (`kvstore kms init`), or copy the "
                    "cluster's keyring there"
                ) from None
            except OSError as exc:
                raise KeyringError(f"keyring {self.path} cannot be read: {exc.strerror}") from None
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
            payload = _open_container(
                data, KEYRING_FILE_FORMAT, self.root_key, _SEAL_INFO, f"keyring {self.path}",
                KeyringError, RootKeyError,
            )
            self._load_payload(payload)
            self._file_id = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load_payload(self, payload: bytes) -> None:
        try:
            doc = msgpack.unpackb(payload, raw=False, use_list=True)
            if not isinstance(doc, dict) or doc.get("format") != KEYRING_FORMAT:
                fmt = doc.get("format") if isinstance(doc, dict) else None
                raise ValueError(f"unknown keyring format {fmt!r} (this version reads {KEYRING_FORMAT})")
            keys = {k.key_id: k for k in map(_key_from_doc, doc["keys"])}
            aliases = {check_alias(a): k for a, k in doc["aliases"].items()}
            if not set(aliases.values()) <= set(keys):
                raise ValueError("an alias names a key that does not exist")
        except (ValueError, KeyError, TypeError, InvalidArgument, msgpack.UnpackException) as exc:
            raise KeyringError(f"keyring {self.path} is corrupt: {exc}") from None
        self._keys, self._aliases = keys, aliases
        self._wrappers.clear()

    def _payload(self) -> bytes:
        return _packb({
            "format": KEYRING_FORMAT,
            "keys": [_key_to_doc(k) for k in self._keys.values()],
            "aliases": dict(self._aliases),
        })

    def _save(self) -> None:
        sealed = _seal_container(KEYRING_FILE_FORMAT, self.root_key, _SEAL_INFO, self._payload())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a leftover tmp file may carry another mode
                view = memoryview(sealed)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself must survive a power failure
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise KeyringError(f"keyring {self.path} could not be written: {exc.strerror or exc}") from None
        st = os.stat(self.path)
        self._file_id = (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        # A sidecar file: the keyring itself is replaced by rename, so a lock on it would not hold.
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyringError(f"keyring lock {lock_path} cannot be opened: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    @contextmanager
    def _change(self) -> Iterator[None]:
        """Apply one change: lock, catch up with the file, mutate, save; roll back on failure."""
        with self._lock, self._file_lock():
            self._reload_if_changed()
            before = self._payload()
            try:
                yield
                self._save()
            except BaseException:
                self._load_payload(before)
                raise

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise KeyringError(f"keyring {self.path} disappeared") from None
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._file_id:
            self.reload()

    # ------------------------------------------------------------------------------- lookups

    def _resolve(self, kek_id_or_alias: str) -> _Key:
        if not isinstance(kek_id_or_alias, str):
            raise InvalidArgument(f"kek id: must be a string, got {type(kek_id_or_alias).__name__}")
        key_id = self._aliases.get(kek_id_or_alias, kek_id_or_alias)
        key = self._keys.get(key_id)
        if key is None:
            what = "alias" if kek_id_or_alias.startswith(ALIAS_PREFIX) else "KEK"
            raise KeyNotFound(f"{what} {kek_id_or_alias!r} is not in keyring {self.path}")
        return key

    def _version(self, key: _Key, version: Any) -> _Version:
        found = key.versions.get(version) if isinstance(version, int) else None
        if found is None:
            raise InvalidArgument(f"KEK {key.key_id} has no version {version!r} (has {sorted(key.versions)})")
        return found

    def _require(self, key: _Key, allowed: tuple[KeyState, ...], action: str) -> None:
        if key.state not in allowed:
            hint = " (cancel the deletion first)" if key.state == KeyState.PENDING_DELETION else ""
            raise InvalidArgument(
                f"KEK {key.key_id} is {key.state}: cannot {action}{hint}; "
                f"that needs {' or '.join(map(str, allowed))}"
            )

    def _usable(self, key: _Key, version: int) -> AESGCM:
        """The wrapping cipher for (key, version), or the error that says why it is unusable."""
        if key.state == KeyState.DESTROYED:
            raise KeyDestroyed(
                f"KEK {key.key_id} was deleted: its key material is destroyed, and everything sealed "
                "under it is unrecoverable"
            )
        if key.state == KeyState.PENDING_DELETION:
            raise KeyUnusable(
                f"KEK {key.key_id} is PendingDeletion (material destroyed after {_date(key.deletion_at)}): "
                "cancel the deletion and enable it to use it"
            )
        if key.state != KeyState.ENABLED:
            raise KeyUnusable(f"KEK {key.key_id} is {key.state}: enable it to use it")
        v = key.versions.get(version)
        if v is None:
            raise KeyUnusable(
                f"KEK {key.key_id} has no version {version} in keyring {self.path} (it has "
                f"{sorted(key.versions)}): import the key from the node that rotated it"
            )
        if v.state != VersionState.ENABLED:
            raise KeyUnusable(f"KEK {key.key_id} version {version} is {v.state}: enable the version to use it")
        wrapper = self._wrappers.get((key.key_id, version))
        if wrapper is None:
            assert v.material is not None  # only Destroyed keys lack material
            info = _WRAP_INFO + b"\0" + key.key_id.encode() + b"\0" + str(version).encode()
            wrapper = self._wrappers[(key.key_id, version)] = AESGCM(_hkdf(v.material, info))
        return wrapper

    # ------------------------------------------------------------------------- data keys

    def generate_data_key(self, kek_id: str, context: EncryptionContext) -> DataKey:
        with self._lock:
            key = self._resolve(kek_id)
            version = key.primary
            wrapper = self._usable(key, version)
        dek = secrets.token_bytes(DEK_BYTES)
        return DataKey(dek, self._wrap(wrapper, key.key_id, version, dek, context), key.key_id, version)

    @staticmethod
    def _wrap(wrapper: AESGCM, key_id: str, version: int, dek: bytes, context: EncryptionContext) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        blob = nonce + wrapper.encrypt(nonce, dek, _wrap_aad(key_id, version, context))
        return pack_wrapped(key_id, version, blob)

    def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        key_id, version, blob = unpack_wrapped(wrapped)
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise KeyUnusable(
                    f"data key is wrapped under KEK {key_id}, which keyring {self.path} does not hold: "
                    "import it from a node that does"
                )
            wrapper = self._usable(key, version)
        if len(blob) != NONCE_BYTES + DEK_BYTES + TAG_BYTES:
            raise DataLoss(f"data key wrapped under KEK {key_id} v{version} has the wrong length")
        try:
            return wrapper.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _wrap_aad(key_id, version, context))
        except InvalidTag:
            raise DataLoss(
                f"data key wrapped under KEK {key_id} v{version} did not authenticate: the wrapped key "
                "was altered, or the encryption context differs"
            ) from None

    def rewrap(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        dek = self.decrypt_data_key(wrapped, context)
        key_id, version, _ = unpack_wrapped(wrapped)
        with self._lock:
            key = self._keys[key_id]
            if version == key.primary:
                return wrapped
            primary = key.primary
            wrapper = self._usable(key, primary)
        return self._wrap(wrapper, key_id, primary, dek, context)

    # -------------------------------------------------------------------------- key admin

    def create_key(self, alias: str | None = None, description: str = "") -> KeyMetadata:
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(f"description: must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
        with self._change():
            if alias is not None:
                self._check_alias_free(alias, None)
            key_id = f"kek-{secrets.token_hex(8)}"  # 64 random bits: ids are public, and stored twice per value
            now = self._clock()
            key = _Key(key_id, description, KeyState.ENABLED, now, 1,
                       {1: _Version(1, VersionState.ENABLED, now, secrets.token_bytes(32))})
            self._keys[key_id] = key
            if alias is not None:
                self._aliases[alias] = key_id
            return _metadata(key, self._aliases)

    def rotate(self, kek_id: str, make_primary: bool = True) -> KeyMetadata:
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED,), "rotate")
            version = max(key.versions) + 1
            key.versions[version] = _Version(version, VersionState.ENABLED, self._clock(), secrets.token_bytes(32))
            if make_primary:
                key.primary = version
            return _metadata(key, self._aliases)

    def set_primary_version(self, kek_id: str, version: int) -> KeyMetadata:
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED, KeyState.DISABLED), "change its primary version")
            if self._version(key, version).state != VersionState.ENABLED:
                raise InvalidArgument(f"KEK {key.key_id} version {version} is Disabled: enable it before making it primary")
            key.primary = version
            return _metadata(key, self._aliases)

    def describe(self, kek_id_or_alias: str) -> KeyMetadata:
        with self._lock:
            return _metadata(self._resolve(kek_id_or_alias), self._aliases)

    def list_keys(self) -> list[KeyMetadata]:
        with self._lock:
            keys = sorted(self._keys.values(), key=lambda k: (k.created_at, k.key_id))
            return [_metadata(k, self._aliases) for k in keys]

    def enable(self, kek_id: str) -> KeyMetadata:
        return self._set_state(kek_id, KeyState.ENABLED, "enable", (KeyState.ENABLED, KeyState.DISABLED))

    def disable(self, kek_id: str) -> KeyMetadata:
        return self._set_state(kek_id, KeyState.DISABLED, "disable", (KeyState.ENABLED, KeyState.DISABLED))

    def _set_state(self, kek_id: str, state: KeyState, action: str, allowed: tuple[KeyState, ...]) -> KeyMetadata:
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, allowed, action)
            key.state = state
            return _metadata(key, self._aliases)

    def enable_version(self, kek_id: str, version: int) -> KeyMetadata:
        return self._set_version_state(kek_id, version, VersionState.ENABLED)

    def disable_version(self, kek_id: str, version: int) -> KeyMetadata:
        return self._set_version_state(kek_id, version, VersionState.DISABLED)

    def _set_version_state(self, kek_id: str, version: int, state: VersionState) -> KeyMetadata:
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED, KeyState.DISABLED), f"change the state of version {version}")
            v = self._version(key, version)
            if state == VersionState.DISABLED and version == key.primary:
                raise InvalidArgument(
                    f"KEK {key.key_id} version {version} is the primary version: rotate or "
                    "set_primary_version to another version before disabling it"
                )
            v.state = state
            return _metadata(key, self._aliases)

    def schedule_deletion(self, kek_id: str, days: int, now: float | None = None) -> KeyMetadata:
        days = check_deletion_days(days)
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED, KeyState.DISABLED), "schedule its deletion")
            key.state = KeyState.PENDING_DELETION
            key.deletion_at = (self._clock() if now is None else now) + days * _DAY_S
            return _metadata(key, self._aliases)

    def cancel_deletion(self, kek_id: str) -> KeyMetadata:
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.PENDING_DELETION,), "cancel a deletion")
            key.state, key.deletion_at = KeyState.DISABLED, None
            return _metadata(key, self._aliases)

    def purge_deleted(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        with self._lock:
            self._reload_if_changed()
            if not any(k.state == KeyState.PENDING_DELETION and k.deletion_at <= now for k in self._keys.values()):
                return []  # the common case: no write, no lock file
        purged: list[str] = []
        with self._change():
            for key in self._keys.values():
                if key.state == KeyState.PENDING_DELETION and key.deletion_at is not None and key.deletion_at <= now:
                    # The id stays as a tombstone so decrypt can say "destroyed", not "unknown".
                    key.state, key.deletion_at = KeyState.DESTROYED, None
                    for v in key.versions.values():
                        v.material = None
                    self._aliases = {a: k for a, k in self._aliases.items() if k != key.key_id}
                    purged.append(key.key_id)
            for key_id, version in list(self._wrappers):
                if key_id in purged:
                    del self._wrappers[(key_id, version)]
        return purged

    # ---------------------------------------------------------------------------- aliases

    def _check_alias_free(self, alias: str, key_id: str | None) -> None:
        check_alias(alias)
        holder = self._aliases.get(alias)
        if holder is not None and holder != key_id:
            raise InvalidArgument(f"alias {alias} already names KEK {holder}")

    def set_alias(self, alias: str, kek_id: str) -> KeyMetadata:
        """Point `alias` at a KEK, creating it or moving it from another KEK."""
        check_alias(alias)
        with self._change():
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_DELETION), "take an alias")
            self._aliases[alias] = key.key_id
            return _metadata(key, self._aliases)

    def delete_alias(self, alias: str) -> None:
        with self._change():
            if self._aliases.pop(check_alias(alias), None) is None:
                raise KeyNotFound(f"alias {alias!r} is not in keyring {self.path}")

    # ------------------------------------------------------------------- sharing across nodes

    def export_key(self, kek_id: str) -> bytes:
        """One KEK with all its versions and aliases, sealed under the root key (only a keyring
        with the same root key can import it). The blob is key material: treat it like the
        keyring, and destroy copies when the key is deleted, or shredding does not hold."""
        with self._lock:
            key = self._resolve(kek_id)
            self._require(key, (KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_DELETION), "export")
            aliases = [a for a, k in self._aliases.items() if k == key.key_id]
            payload = _packb({"format": EXPORT_FORMAT, "key": _key_to_doc(key), "aliases": aliases})
        return _seal_container(EXPORT_FORMAT, self.root_key, _EXPORT_INFO, payload)

    def import_key(self, blob: bytes) -> KeyMetadata:
        """Add an exported KEK, or the versions of it this keyring lacks.

        An existing key keeps its own state, primary version and version states: those are
        operator decisions applied on every node (the CLI fans them out). Versions present on both
        sides must hold the same material, or the two keyrings diverged (rotated separately).
        """
        if not isinstance(blob, bytes):
            raise InvalidArgument("key export: must be bytes")
        payload = _open_container(blob, EXPORT_FORMAT, self.root_key, _EXPORT_INFO, "key export",
                                  InvalidArgument, InvalidArgument)
        try:
            doc = msgpack.unpackb(payload, raw=False, use_list=True)
            if doc["format"] != EXPORT_FORMAT:
                raise ValueError(f"unknown export format {doc['format']!r}")
            incoming = _key_from_doc(doc["key"])
            aliases = [check_alias(a) for a in doc["aliases"]]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise InvalidArgument(f"key export is malformed: {exc}") from None
        with self._change():
            for alias in aliases:
                self._check_alias_free(alias, incoming.key_id)
            local = self._keys.get(incoming.key_id)
            if local is None:
                self._keys[incoming.key_id] = local = incoming
            elif local.state == KeyState.DESTROYED:
                raise InvalidArgument(
                    f"KEK {local.key_id} was deleted from this keyring: importing it would undo the "
                    "crypto-shredding; refusing"
                )
            else:
                for number, v in incoming.versions.items():
                    mine = local.versions.get(number)
                    if mine is None:
                        local.versions[number] = v
                    elif not hmac.compare_digest(mine.material or b"", v.material or b""):
                        raise InvalidArgument(
                            f"KEK {local.key_id} version {number} differs between the two keyrings "
                            "(rotated on two nodes separately?): rotate on one node only, then import there"
                        )
            for alias in aliases:
                self._aliases[alias] = local.key_id
            return _metadata(local, self._aliases)


def _date(unix_s: float | None) -> str:
    if unix_s is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))

