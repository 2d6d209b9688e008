"""The synchronous facade: `kvstore.SyncClient`, the trio Client's methods for scripts and REPLs.

It runs one trio loop in a background thread and calls into it with trio.from_thread, so both
clients share every line of request, routing and retry logic.
"""
from __future__ import annotations

import functools
import threading
from typing import Any

import trio

from kvstore.client.aio import Client


class SyncClient:
    """`with SyncClient("127.0.0.1:7000") as kv: kv.put(b"k", b"v"); kv.get(b"k").value`"""

    def __init__(self, addresses: Any, **options: Any) -> None:
        self._client = Client(addresses, **options)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            ready.set()
            await self._stop.wait()

        self._thread = threading.Thread(target=trio.run, args=(main,), name="kvstore-sync-client", daemon=True)
        self._thread.start()
        ready.wait()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_") or name == "close":
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(functools.partial(attr, *args, **kwargs), trio_token=self._token)

        return call

    def list_keys(self, **options: Any) -> list[bytes]:
        """Client.list_keys, collected into a list (bound it with `limit` on a large store)."""

        async def collect() -> list[bytes]:
            return [key async for key in self._client.list_keys(**options)]

        return trio.from_thread.run(collect, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive():
            self._client.close()
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
