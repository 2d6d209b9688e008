"""Provisioning a cluster's keys: a root key file and a keyring holding the cluster KEK.

Used by `kvstore kms init`, `scripts/cluster up` and test fixtures, so every node of a cluster
gets the same KEK id and material (like a multi-region key) without any of them re-encrypting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvstore.kms.local import LocalKms, generate_root_key, load_root_key
from kvstore.kms.provider import KeyNotFound

DEFAULT_ALIAS = "alias/kvstore"


@dataclass(frozen=True)
class ClusterKeys:
    keyring: Path
    root_key_file: Path
    alias: str = DEFAULT_ALIAS

    def node_args(self) -> list[str]:
        """Command-line flags that point a node at these keys."""
        return ["--kms-keyring", str(self.keyring), "--kms-root-key-file", str(self.root_key_file),
                "--kms-key", self.alias]


def write_root_key_file(path: Path) -> None:
    """A new random root key in a 0600 file (created exclusively: never overwrites a key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_root_key() + "\n")


def provision(keys_dir: Path, alias: str = DEFAULT_ALIAS) -> ClusterKeys:
    """Create (or reuse) keys_dir/root.key and keys_dir/keyring with a KEK named `alias`."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    root_file, keyring = keys_dir / "root.key", keys_dir / "keyring"
    if not root_file.exists():
        write_root_key_file(root_file)
    root = load_root_key(root_file, environ={})
    kms = LocalKms.open(keyring, root) if keyring.exists() else LocalKms.create(keyring, root)
    try:
        kms.describe(alias)
    except KeyNotFound:
        kms.create_key(alias=alias, description="kvstore cluster key")
    return ClusterKeys(keyring, root_file, alias)
