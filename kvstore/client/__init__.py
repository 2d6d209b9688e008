"""Client libraries: the trio Client and the synchronous SyncClient facade."""
from kvstore.client.aio import Client, Version, Versions, latest
from kvstore.client.sync import SyncClient

__all__ = ["Client", "SyncClient", "Version", "Versions", "latest"]
