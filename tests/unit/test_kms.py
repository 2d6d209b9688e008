"""LocalKms: root-key discovery, the sealed keyring file, key and version states, deletion and
purge (crypto-shredding), aliases, and sharing a KEK between keyrings (export/import)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvstore.errors import DataLoss, InvalidArgument, PermissionDenied
from kvstore.kms import (
    ROOT_KEY_ENV,
    KeyDestroyed,
    KeyNotFound,
    KeyringError,
    KeyState,
    KeyUnusable,
    KmsProvider,
    LocalKms,
    RootKey,
    RootKeyError,
    VersionState,
    generate_root_key,
    load_root_key,
)

CTX = {"purpose": "test"}
DAY_S = 86400.0
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _root(text: str | None = None) -> RootKey:
    return load_root_key(environ={ROOT_KEY_ENV: text or generate_root_key()})


@pytest.fixture
def root() -> RootKey:
    return _root()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kms(tmp_path: Path, root: RootKey, clock: FakeClock) -> LocalKms:
    return LocalKms.create(tmp_path / "keyring", root, clock=clock)


def _material(kms: LocalKms, key_id: str) -> list[bytes]:
    """Test-only peek at the key material, to prove it never reaches a file unsealed."""
    return [v.material for v in kms._keys[key_id].versions.values() if v.material is not None]


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ----------------------------------------------------------------------------------- root key


def test_root_key_from_env_is_32_bytes_and_names_its_source() -> None:
    key = _root()
    assert len(key.material) == 32
    assert key.source == f"${ROOT_KEY_ENV}"
    assert key.material.hex() not in repr(key)


def test_missing_root_key_is_refused_naming_both_sources() -> None:
    with pytest.raises(RootKeyError, match=rf"no root key: set \${ROOT_KEY_ENV}.*root key file"):
        load_root_key(environ={})


def test_root_key_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RootKeyError, match="given twice"):
        load_root_key(tmp_path / "root.key", environ={ROOT_KEY_ENV: generate_root_key()})


@pytest.mark.parametrize("text, problem", [
    ("not base64!!", "not valid base64"),
    ("AAAA", "is 3 bytes"),
])
def test_malformed_root_key_is_refused(text: str, problem: str) -> None:
    with pytest.raises(RootKeyError, match=problem):
        load_root_key(environ={ROOT_KEY_ENV: text})


def test_root_key_file_with_mode_0600_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    text = generate_root_key()
    path.write_text(text + "\n")
    path.chmod(0o600)
    key = load_root_key(path, environ={})
    assert key.material == _root(text).material
    assert str(path) in key.source


def test_root_key_file_with_mode_0644_is_refused_naming_file_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_text(generate_root_key())
    path.chmod(0o644)
    with pytest.raises(RootKeyError, match=rf"{path} has mode 0644: it must be 0600"):
        load_root_key(path, environ={})


def test_missing_root_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RootKeyError, match="does not exist"):
        load_root_key(tmp_path / "nope.key", environ={})


def test_root_key_file_inside_the_data_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "root.key"
    path.parent.mkdir()
    path.write_text(generate_root_key())
    path.chmod(0o600)
    with pytest.raises(RootKeyError, match="inside the data directory"):
        load_root_key(path, environ={}, data_dir=tmp_path / "data")


# ------------------------------------------------------------------------------- keyring file


def test_keyring_file_is_mode_0600_even_with_a_permissive_umask(tmp_path: Path, root: RootKey) -> None:
    old = os.umask(0)
    try:
        kms = LocalKms.create(tmp_path / "keyring", root)
        kms.create_key()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(kms.path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_keyring_is_persisted_and_reloaded(tmp_path: Path, kms: LocalKms, root: RootKey) -> None:
    key = kms.create_key(alias="alias/cluster", description="cluster KEK")
    wrapped_v1 = kms.generate_data_key(key.key_id, CTX)
    kms.rotate(key.key_id)
    kms.disable_version(key.key_id, 1)
    kms.enable_version(key.key_id, 1)
    wrapped_v2 = kms.generate_data_key("alias/cluster", CTX)

    reopened = LocalKms.open(tmp_path / "keyring", root)
    assert reopened.list_keys() == kms.list_keys()
    assert reopened.describe("alias/cluster").primary_version == 2
    assert reopened.decrypt_data_key(wrapped_v1.wrapped, CTX) == wrapped_v1.plaintext
    assert reopened.decrypt_data_key(wrapped_v2.wrapped, CTX) == wrapped_v2.plaintext


def test_wrong_root_key_is_refused_with_root_key_error(kms: LocalKms) -> None:
    kms.create_key()
    other = _root()
    with pytest.raises(RootKeyError, match=rf"wrong root key: keyring {kms.path} was sealed by root key "
                                           rf"{kms.root_key.fingerprint}.*{other.fingerprint}"):
        LocalKms.open(kms.path, other)


def test_missing_keyring_is_refused(tmp_path: Path, root: RootKey) -> None:
    with pytest.raises(KeyringError, match="does not exist"):
        LocalKms.open(tmp_path / "keyring", root)


def test_altered_keyring_is_refused_as_corrupt(kms: LocalKms, root: RootKey) -> None:
    kms.create_key()
    data = kms.path.read_bytes()
    kms.path.write_bytes(_flip(data, len(data) - 5))
    with pytest.raises(KeyringError, match="did not authenticate under the root key") as info:
        LocalKms.open(kms.path, root)
    assert not isinstance(info.value, RootKeyError)


def test_create_refuses_an_existing_keyring(kms: LocalKms, root: RootKey) -> None:
    with pytest.raises(KeyringError, match="already exists"):
        LocalKms.create(kms.path, root)


def test_keyring_inside_the_data_dir_is_refused(tmp_path: Path, root: RootKey) -> None:
    with pytest.raises(KeyringError, match="inside the data directory"):
        LocalKms.create(tmp_path / "data" / "keyring", root, data_dir=tmp_path / "data")


def test_no_key_material_or_data_key_reaches_the_keyring_file(kms: LocalKms) -> None:
    sentinel = "SENTINEL-description-7f3a"
    key = kms.create_key(description=sentinel)
    kms.rotate(key.key_id)
    data_key = kms.generate_data_key(key.key_id, CTX)
    files = b"".join(p.read_bytes() for p in kms.path.parent.iterdir())
    for secret in [*_material(kms, key.key_id), data_key.plaintext, sentinel.encode()]:
        assert secret not in files
    assert data_key.plaintext not in data_key.wrapped
    assert data_key.plaintext.hex() not in repr(data_key)


def test_a_change_made_by_another_process_is_seen_before_the_next_change(kms: LocalKms, root: RootKey) -> None:
    key = kms.create_key()
    cli = LocalKms.open(kms.path, root)
    cli.disable(key.key_id)
    with pytest.raises(InvalidArgument, match="is Disabled: cannot rotate"):
        kms.rotate(key.key_id)
    kms.reload()
    assert kms.describe(key.key_id).state == KeyState.DISABLED


def test_a_failed_change_leaves_the_keyring_as_it_was(kms: LocalKms, root: RootKey) -> None:
    key = kms.create_key(alias="alias/a")
    before = kms.list_keys()
    with pytest.raises(InvalidArgument):
        kms.create_key(alias="alias/a")
    with pytest.raises(InvalidArgument):
        kms.disable_version(key.key_id, 1)
    assert kms.list_keys() == before == LocalKms.open(kms.path, root).list_keys()


# --------------------------------------------------------------------------------- data keys


def test_local_kms_implements_the_provider_protocol(kms: LocalKms) -> None:
    assert isinstance(kms, KmsProvider)


def test_data_key_round_trips_under_its_context(kms: LocalKms) -> None:
    key = kms.create_key()
    data_key = kms.generate_data_key(key.key_id, CTX)
    assert len(data_key.plaintext) == 32
    assert (data_key.kek_id, data_key.kek_version) == (key.key_id, 1)
    assert kms.decrypt_data_key(data_key.wrapped, dict(CTX)) == data_key.plaintext


def test_data_key_with_another_context_fails_as_data_loss(kms: LocalKms) -> None:
    data_key = kms.generate_data_key(kms.create_key().key_id, CTX)
    with pytest.raises(DataLoss, match="encryption context differs"):
        kms.decrypt_data_key(data_key.wrapped, {"purpose": "other"})


def test_every_flipped_byte_of_a_wrapped_data_key_is_caught(kms: LocalKms) -> None:
    data_key = kms.generate_data_key(kms.create_key().key_id, CTX)
    for index in range(len(data_key.wrapped)):
        with pytest.raises((DataLoss, KeyUnusable)):
            kms.decrypt_data_key(_flip(data_key.wrapped, index), CTX)


def test_unknown_key_is_key_not_found(kms: LocalKms) -> None:
    with pytest.raises(KeyNotFound, match="'kek-nope' is not in keyring"):
        kms.generate_data_key("kek-nope", CTX)
    with pytest.raises(KeyNotFound, match="alias 'alias/nope'"):
        kms.describe("alias/nope")


# ---------------------------------------------------------------------------------- rotation


def test_rotation_adds_a_primary_version_and_old_data_keys_still_decrypt(kms: LocalKms) -> None:
    key = kms.create_key()
    old = kms.generate_data_key(key.key_id, CTX)
    meta = kms.rotate(key.key_id)
    assert meta.primary_version == 2
    assert [v.version for v in meta.versions] == [1, 2]
    new = kms.generate_data_key(key.key_id, CTX)
    assert (old.kek_version, new.kek_version) == (1, 2)
    assert kms.decrypt_data_key(old.wrapped, CTX) == old.plaintext
    assert kms.decrypt_data_key(new.wrapped, CTX) == new.plaintext


def test_staged_rotation_keeps_the_primary_until_promoted(kms: LocalKms) -> None:
    key = kms.create_key()
    assert kms.rotate(key.key_id, make_primary=False).primary_version == 1
    assert kms.generate_data_key(key.key_id, CTX).kek_version == 1
    assert kms.set_primary_version(key.key_id, 2).primary_version == 2
    assert kms.generate_data_key(key.key_id, CTX).kek_version == 2


def test_the_primary_version_cannot_be_disabled(kms: LocalKms) -> None:
    key = kms.create_key()
    with pytest.raises(InvalidArgument, match="version 1 is the primary version"):
        kms.disable_version(key.key_id, 1)


def test_a_disabled_version_refuses_its_data_keys_until_enabled(kms: LocalKms) -> None:
    key = kms.create_key()
    old = kms.generate_data_key(key.key_id, CTX)
    kms.rotate(key.key_id)
    kms.disable_version(key.key_id, 1)
    with pytest.raises(KeyUnusable, match=f"KEK {key.key_id} version 1 is Disabled"):
        kms.decrypt_data_key(old.wrapped, CTX)
    kms.enable_version(key.key_id, 1)
    assert kms.decrypt_data_key(old.wrapped, CTX) == old.plaintext


def test_rewrap_moves_a_data_key_to_the_primary_version(kms: LocalKms) -> None:
    key = kms.create_key()
    old = kms.generate_data_key(key.key_id, CTX)
    assert kms.rewrap(old.wrapped, CTX) == old.wrapped  # already current: unchanged
    kms.rotate(key.key_id)
    rewrapped = kms.rewrap(old.wrapped, CTX)
    kms.disable_version(key.key_id, 1)
    assert kms.decrypt_data_key(rewrapped, CTX) == old.plaintext
    with pytest.raises(KeyUnusable):
        kms.decrypt_data_key(old.wrapped, CTX)


# -------------------------------------------------------------------------------- key states


def test_disabled_key_refuses_data_keys_naming_id_and_state(kms: LocalKms) -> None:
    key = kms.create_key()
    data_key = kms.generate_data_key(key.key_id, CTX)
    kms.disable(key.key_id)
    for call in (lambda: kms.generate_data_key(key.key_id, CTX), lambda: kms.decrypt_data_key(data_key.wrapped, CTX)):
        with pytest.raises(KeyUnusable, match=f"KEK {key.key_id} is Disabled: enable it") as info:
            call()
        assert isinstance(info.value, PermissionDenied)
    kms.enable(key.key_id)
    assert kms.decrypt_data_key(data_key.wrapped, CTX) == data_key.plaintext


@pytest.mark.parametrize("days", [6, 31, 0, -7, 7.5, True, "7", None])
def test_deletion_window_must_be_7_to_30_days(kms: LocalKms, days: object) -> None:
    key = kms.create_key()
    with pytest.raises(InvalidArgument, match=r"days must be an integer in 7\.\.30"):
        kms.schedule_deletion(key.key_id, days, now=T0)  # type: ignore[arg-type]
    assert kms.describe(key.key_id).state == KeyState.ENABLED


@pytest.mark.parametrize("days", [7, 30])
def test_deletion_window_bounds_are_accepted(kms: LocalKms, days: int) -> None:
    meta = kms.schedule_deletion(kms.create_key().key_id, days, now=T0)
    assert meta.state == KeyState.PENDING_DELETION
    assert meta.deletion_at == T0 + days * DAY_S


def test_pending_deletion_refuses_use_and_enable_until_cancelled(kms: LocalKms) -> None:
    key = kms.create_key()
    data_key = kms.generate_data_key(key.key_id, CTX)
    kms.schedule_deletion(key.key_id, 7, now=T0)
    with pytest.raises(KeyUnusable, match=f"KEK {key.key_id} is PendingDeletion"):
        kms.decrypt_data_key(data_key.wrapped, CTX)
    with pytest.raises(InvalidArgument, match="cancel the deletion first"):
        kms.enable(key.key_id)
    assert kms.cancel_deletion(key.key_id).state == KeyState.DISABLED  # as AWS KMS: enable is explicit
    kms.enable(key.key_id)
    assert kms.decrypt_data_key(data_key.wrapped, CTX) == data_key.plaintext


def test_purge_after_the_window_destroys_the_material(kms: LocalKms, root: RootKey) -> None:
    key = kms.create_key(alias="alias/doomed")
    keep = kms.create_key()
    data_key = kms.generate_data_key(key.key_id, CTX)
    material = _material(kms, key.key_id)
    kms.schedule_deletion(key.key_id, 7, now=T0)

    assert kms.purge_deleted(now=T0 + 7 * DAY_S - 1) == []
    assert kms.purge_deleted(now=T0 + 7 * DAY_S) == [key.key_id]

    reopened = LocalKms.open(kms.path, root)
    for keyring in (kms, reopened):
        with pytest.raises(KeyDestroyed, match=f"KEK {key.key_id} was deleted: its key material is destroyed"):
            keyring.decrypt_data_key(data_key.wrapped, CTX)
        assert keyring.describe(key.key_id).state == KeyState.DESTROYED
        assert keyring.describe(key.key_id).aliases == ()
        assert _material(keyring, key.key_id) == []
        assert keyring.describe(keep.key_id).state == KeyState.ENABLED
    with pytest.raises(KeyNotFound):
        reopened.describe("alias/doomed")
    assert not any(m in kms.path.read_bytes() for m in material)
    with pytest.raises(InvalidArgument, match="is Destroyed: cannot enable"):
        kms.enable(key.key_id)


# ----------------------------------------------------------------------------------- aliases


def test_aliases_resolve_move_and_are_deleted(kms: LocalKms) -> None:
    a, b = kms.create_key(alias="alias/app"), kms.create_key()
    assert kms.describe("alias/app").key_id == a.key_id
    assert kms.set_alias("alias/app", b.key_id).aliases == ("alias/app",)
    assert kms.describe(a.key_id).aliases == ()
    assert kms.generate_data_key("alias/app", CTX).kek_id == b.key_id
    kms.delete_alias("alias/app")
    with pytest.raises(KeyNotFound):
        kms.describe("alias/app")


@pytest.mark.parametrize("alias", ["app", "alias/", "alias/has space", "alias/" + "x" * 251])
def test_malformed_aliases_are_refused(kms: LocalKms, alias: str) -> None:
    with pytest.raises(InvalidArgument, match="must be 'alias/'"):
        kms.create_key(alias=alias)


def test_an_alias_names_one_key(kms: LocalKms) -> None:
    kms.create_key(alias="alias/app")
    with pytest.raises(InvalidArgument, match="alias/app already names KEK"):
        kms.create_key(alias="alias/app")


# ------------------------------------------------------------------ sharing a KEK across nodes


@pytest.fixture
def node_b(tmp_path: Path, root: RootKey) -> LocalKms:
    (tmp_path / "b").mkdir()
    return LocalKms.create(tmp_path / "b" / "keyring", root)


def test_an_exported_key_opens_the_same_data_keys_on_another_node(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key(alias="alias/cluster")
    data_key = kms.generate_data_key(key.key_id, CTX)
    blob = kms.export_key("alias/cluster")
    assert not any(m in blob for m in _material(kms, key.key_id))

    imported = node_b.import_key(blob)
    assert imported == kms.describe(key.key_id)
    assert node_b.decrypt_data_key(data_key.wrapped, CTX) == data_key.plaintext
    from_b = node_b.generate_data_key("alias/cluster", CTX)
    assert kms.decrypt_data_key(from_b.wrapped, CTX) == from_b.plaintext


def test_import_adds_new_versions_but_keeps_local_state_and_primary(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key()
    node_b.import_key(kms.export_key(key.key_id))
    kms.rotate(key.key_id)
    v2 = kms.generate_data_key(key.key_id, CTX)
    node_b.disable(key.key_id)

    meta = node_b.import_key(kms.export_key(key.key_id))
    assert [v.version for v in meta.versions] == [1, 2]
    assert (meta.state, meta.primary_version) == (KeyState.DISABLED, 1)
    node_b.enable(key.key_id)
    assert node_b.decrypt_data_key(v2.wrapped, CTX) == v2.plaintext
    assert node_b.import_key(kms.export_key(key.key_id)) == node_b.describe(key.key_id)  # idempotent


def test_a_node_missing_a_version_says_to_import_it(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key()
    node_b.import_key(kms.export_key(key.key_id))
    kms.rotate(key.key_id)
    with pytest.raises(KeyUnusable, match="has no version 2 .* import the key"):
        node_b.decrypt_data_key(kms.generate_data_key(key.key_id, CTX).wrapped, CTX)


def test_a_data_key_of_a_kek_this_node_lacks_says_to_import_it(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key()
    with pytest.raises(KeyUnusable, match=f"KEK {key.key_id}, which keyring .* does not hold: import"):
        node_b.decrypt_data_key(kms.generate_data_key(key.key_id, CTX).wrapped, CTX)


def test_import_under_another_root_key_is_refused(kms: LocalKms, tmp_path: Path) -> None:
    key = kms.create_key()
    (tmp_path / "c").mkdir()
    stranger = LocalKms.create(tmp_path / "c" / "keyring", _root())
    with pytest.raises(InvalidArgument, match="wrong root key: key export was sealed by root key"):
        stranger.import_key(kms.export_key(key.key_id))
    with pytest.raises(InvalidArgument, match="did not authenticate"):
        kms.import_key(_flip(kms.export_key(key.key_id), -3))


def test_import_of_diverged_versions_is_refused(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key()
    node_b.import_key(kms.export_key(key.key_id))
    kms.rotate(key.key_id)
    node_b.rotate(key.key_id)
    before = node_b.list_keys()
    with pytest.raises(InvalidArgument, match="version 2 differs between the two keyrings"):
        node_b.import_key(kms.export_key(key.key_id))
    assert node_b.list_keys() == before


def test_import_cannot_resurrect_a_destroyed_key(kms: LocalKms, node_b: LocalKms) -> None:
    key = kms.create_key()
    blob = kms.export_key(key.key_id)
    kms.schedule_deletion(key.key_id, 7, now=T0)
    kms.purge_deleted(now=T0 + 30 * DAY_S)
    with pytest.raises(InvalidArgument, match="would undo the crypto-shredding"):
        kms.import_key(blob)
    with pytest.raises(InvalidArgument, match="is Destroyed: cannot export"):
        kms.export_key(key.key_id)
    assert node_b.import_key(blob).key_id == key.key_id  # a copy elsewhere is the operator's to destroy


def test_version_states_survive_reload(kms: LocalKms, root: RootKey) -> None:
    key = kms.create_key()
    kms.rotate(key.key_id)
    kms.disable_version(key.key_id, 1)
    versions = LocalKms.open(kms.path, root).describe(key.key_id).versions
    assert [(v.version, v.state) for v in versions] == [(1, VersionState.DISABLED), (2, VersionState.ENABLED)]
