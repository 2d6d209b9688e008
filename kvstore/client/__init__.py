"""Client libraries: the trio Client and the synchronous SyncClient facade."""
from kvstore.client.aio import Client, KeyPage, Version, Versions, latest
from kvstore.client.sync import SyncClient

__all__ = ["Client", "KeyPage", "SyncClient", "Version", "Versions", "latest"]
