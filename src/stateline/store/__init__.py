"""The Store port and its helpers; adapters live beside it, one module each."""

from stateline.store.protocol import (
    DEFAULT_MAX_VALUE_BYTES,
    ChangeRecorder,
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedEvent,
    PreparedIncr,
    PreparedOp,
    PreparedPut,
    PreparedTrim,
    Store,
    decode_change,
    prefix_end,
)

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "ChangeRecorder",
    "PreparedAppend",
    "PreparedCommit",
    "PreparedDelete",
    "PreparedEvent",
    "PreparedIncr",
    "PreparedOp",
    "PreparedPut",
    "PreparedTrim",
    "Store",
    "decode_change",
    "prefix_end",
]
