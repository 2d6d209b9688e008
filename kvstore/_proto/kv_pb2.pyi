from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Level(_message.Message):
    __slots__ = ("named", "count")
    class Named(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DEFAULT: _ClassVar[Level.Named]
        ONE: _ClassVar[Level.Named]
        QUORUM: _ClassVar[Level.Named]
        ALL: _ClassVar[Level.Named]
    DEFAULT: Level.Named
    ONE: Level.Named
    QUORUM: Level.Named
    ALL: Level.Named
    NAMED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    named: Level.Named
    count: int
    def __init__(self, named: _Optional[_Union[Level.Named, str]] = ..., count: _Optional[int] = ...) -> None: ...

class Options(_message.Message):
    __slots__ = ("n", "strict", "timeout_ms")
    N_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    n: int
    strict: bool
    timeout_ms: int
    def __init__(self, n: _Optional[int] = ..., strict: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Sibling(_message.Message):
    __slots__ = ("value", "tombstone", "hlc", "node_id", "expires_at_ms")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONE_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    tombstone: bool
    hlc: int
    node_id: str
    expires_at_ms: int
    def __init__(self, value: _Optional[bytes] = ..., tombstone: _Optional[bool] = ..., hlc: _Optional[int] = ..., node_id: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "context", "w", "options", "ttl_s", "conditional")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    context: bytes
    w: Level
    options: Options
    ttl_s: int
    conditional: bool
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., context: _Optional[bytes] = ..., w: _Optional[_Union[Level, _Mapping]] = ..., options: _Optional[_Union[Options, _Mapping]] = ..., ttl_s: _Optional[int] = ..., conditional: _Optional[bool] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    def __init__(self, context: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "r", "options")
    KEY_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    r: Level
    options: Options
    def __init__(self, key: _Optional[bytes] = ..., r: _Optional[_Union[Level, _Mapping]] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "siblings", "context")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    found: bool
    siblings: _containers.RepeatedCompositeFieldContainer[Sibling]
    context: bytes
    def __init__(self, found: _Optional[bool] = ..., siblings: _Optional[_Iterable[_Union[Sibling, _Mapping]]] = ..., context: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "context", "w", "options")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    context: bytes
    w: Level
    options: Options
    def __init__(self, key: _Optional[bytes] = ..., context: _Optional[bytes] = ..., w: _Optional[_Union[Level, _Mapping]] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    def __init__(self, context: _Optional[bytes] = ...) -> None: ...

class ItemStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchPutRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[PutRequest, _Mapping]]] = ...) -> None: ...

class BatchPutResponse(_message.Message):
    __slots__ = ("results", "statuses")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResponse]
    statuses: _containers.RepeatedCompositeFieldContainer[ItemStatus]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResponse, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[ItemStatus, _Mapping]]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[GetRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[GetRequest, _Mapping]]] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("results", "statuses")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResponse]
    statuses: _containers.RepeatedCompositeFieldContainer[ItemStatus]
    def __init__(self, results: _Optional[_Iterable[_Union[GetResponse, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[ItemStatus, _Mapping]]] = ...) -> None: ...

class BatchDeleteRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DeleteRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[DeleteRequest, _Mapping]]] = ...) -> None: ...

class BatchDeleteResponse(_message.Message):
    __slots__ = ("results", "statuses")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DeleteResponse]
    statuses: _containers.RepeatedCompositeFieldContainer[ItemStatus]
    def __init__(self, results: _Optional[_Iterable[_Union[DeleteResponse, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[ItemStatus, _Mapping]]] = ...) -> None: ...

class RingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RingNode(_message.Message):
    __slots__ = ("node_id", "address", "zone", "tokens", "up")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    zone: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    up: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., up: _Optional[bool] = ...) -> None: ...

class RingResponse(_message.Message):
    __slots__ = ("nodes", "n", "epoch")
    NODES_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[RingNode]
    n: int
    epoch: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[RingNode, _Mapping]]] = ..., n: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("id", "timeout_ms", "put", "get", "delete")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    id: int
    timeout_ms: int
    put: BatchPutRequest
    get: BatchGetRequest
    delete: BatchDeleteRequest
    def __init__(self, id: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., put: _Optional[_Union[BatchPutRequest, _Mapping]] = ..., get: _Optional[_Union[BatchGetRequest, _Mapping]] = ..., delete: _Optional[_Union[BatchDeleteRequest, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("id", "error", "put", "get", "delete")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    id: int
    error: ItemStatus
    put: BatchPutResponse
    get: BatchGetResponse
    delete: BatchDeleteResponse
    def __init__(self, id: _Optional[int] = ..., error: _Optional[_Union[ItemStatus, _Mapping]] = ..., put: _Optional[_Union[BatchPutResponse, _Mapping]] = ..., get: _Optional[_Union[BatchGetResponse, _Mapping]] = ..., delete: _Optional[_Union[BatchDeleteResponse, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("prefix", "start_after", "limit", "replicas", "options")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    start_after: bytes
    limit: int
    replicas: int
    options: Options
    def __init__(self, prefix: _Optional[bytes] = ..., start_after: _Optional[bytes] = ..., limit: _Optional[int] = ..., replicas: _Optional[int] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "cursor", "missing_ranges", "total_ranges")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RANGES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    cursor: bytes
    missing_ranges: int
    total_ranges: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., cursor: _Optional[bytes] = ..., missing_ranges: _Optional[int] = ..., total_ranges: _Optional[int] = ...) -> None: ...
