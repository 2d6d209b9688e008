"""Encryption at rest on a node: builds the key service and sealer from the config (refusing to
start, with the reason, when the root key or keyring is missing or wrong) and reloads the keyring
when `kvstore kms` changes it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from kvstore.config import NodeConfig
from kvstore.errors import KvError
from kvstore.node.watch import file_stamp

log = logging.getLogger(__name__)


class Keys:
    """The node's key service and sealer, and the watch that picks up keyring changes made by
    `kvstore kms` (disable, rotate, ...) within kms_check_interval_s."""

    def __init__(self, kms: Any, sealer: Any, keyring: Path | None) -> None:
        self.kms = kms
        self.sealer = sealer
        self.keyring = keyring
        self._stamp = self._file_stamp()

    @classmethod
    def load(cls, config: NodeConfig) -> "Keys":
        from kvstore.kms import KeyringError, KeyNotFound, LocalKms, NullSealer, Sealer, SealerConfig, load_root_key

        if config.encryption == "none":
            return cls(None, NullSealer(), None)
        if not config.kms_keyring:
            raise SystemExit(
                "refusing to start: encryption at rest needs a keyring: pass --kms-keyring PATH (create one "
                "with `kvstore kms init --keyring PATH --root-key-file FILE`), or --encryption none"
            )
        try:
            root = load_root_key(Path(config.kms_root_key_file) if config.kms_root_key_file else None,
                                 data_dir=config.data_dir)
            kms = LocalKms.open(Path(config.kms_keyring), root, data_dir=config.data_dir)
            kms.describe(config.kms_key)
        except (KeyringError, KeyNotFound) as exc:
            raise SystemExit(f"refusing to start: {exc}") from None
        sealer = Sealer(kms, config.kms_key, SealerConfig(key_check_interval_s=config.kms_check_interval_s))
        return cls(kms, sealer, Path(config.kms_keyring))

    def _file_stamp(self) -> tuple[int, int, int] | None:
        return None if self.keyring is None else file_stamp(self.keyring)

    def reload(self) -> None:
        if self.kms is not None:
            self.kms.reload()
            self.sealer.clear_cache()
            self._stamp = self._file_stamp()

    async def watch(self, interval_s: float) -> None:
        while self.kms is not None:
            await trio.sleep(interval_s)
            if self._file_stamp() != self._stamp:
                try:
                    self.reload()
                    log.info("keyring %s changed: reloaded", self.keyring)
                except KvError as exc:
                    log.error("keyring %s could not be reloaded: %s", self.keyring, exc)

    def describe(self) -> dict[str, Any]:
        if self.kms is None:
            return {"enabled": False}
        st = self.sealer.stats
        return {"enabled": True, "kek": self.sealer.kek_id, "seals": st.seals, "opens": st.opens,
                "dek_rotations": st.dek_rotations}
