"""The key service and encryption at rest: the public surface of kvstore.kms.

A node builds one `Sealer` at startup over a provider (`LocalKms` today; a remote KMS behind the
same `KmsProvider` protocol later) and passes every value through `seal`/`open`. Everything else
(KEK admin, export/import, re-wrap) is for the CLI, admin RPCs and background jobs.
"""
from kvstore.kms.envelope import (
    DEFAULT_CONTEXT,
    ENVELOPE_FORMAT,
    PLAINTEXT_FORMAT,
    NullSealer,
    Sealer,
    SealerConfig,
    SealerStats,
    rewrap_envelope,
)
from kvstore.kms.local import ROOT_KEY_ENV, LocalKms, RootKey, generate_root_key, load_root_key
from kvstore.kms.provider import (
    DataKey,
    EncryptionContext,
    KeyDestroyed,
    KeyMetadata,
    KeyNotFound,
    KeyringError,
    KeyState,
    KeyUnusable,
    KeyVersionInfo,
    KmsProvider,
    RootKeyError,
    VersionState,
)

__all__ = [
    # sealing values
    "Sealer", "SealerConfig", "SealerStats", "NullSealer", "rewrap_envelope",
    "DEFAULT_CONTEXT", "ENVELOPE_FORMAT", "PLAINTEXT_FORMAT",
    # providers
    "KmsProvider", "LocalKms", "DataKey", "KeyMetadata", "KeyVersionInfo", "KeyState", "VersionState",
    "EncryptionContext",
    # root key
    "RootKey", "load_root_key", "generate_root_key", "ROOT_KEY_ENV",
    # errors
    "KeyNotFound", "KeyUnusable", "KeyDestroyed", "KeyringError", "RootKeyError",
]
