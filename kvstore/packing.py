"""msgpack packing through one reusable Packer per thread (no I/O: the core packs through it).

`msgpack.packb` builds and frees a Packer and its buffer on every call: 0.4-0.8 µs of the
0.2-1.5 µs that packing a record, a value's AAD or a sealed envelope takes, and a coordinator
packs all three for every put it stamps. A Packer owns a buffer, so each thread keeps its own; it
empties its buffer when a pack fails, so a bad object costs only that call.
"""
from __future__ import annotations

import threading
from typing import Any

import msgpack

_local = threading.local()


def packb(obj: Any) -> bytes:
    """`msgpack.packb(obj, use_bin_type=True)`, byte for byte."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)
