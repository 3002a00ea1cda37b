"""The TypeHandler extension API in one namespace (also re-exported from ``flax_ckpt``)."""

from flax_ckpt._src.leaves.builtin_handlers import ArrayHandler, ScalarHandler
from flax_ckpt._src.leaves.type_handlers import (
    ArrayMetadata,
    ArrayRestoreArgs,
    Metadata,
    ParamInfo,
    RestoreArgs,
    SaveArgs,
    TypeHandler,
    ValueMetadata,
    get_type_handler,
    has_type_handler,
    register_type_handler,
)

__all__ = [
    "ArrayHandler",
    "ArrayMetadata",
    "ArrayRestoreArgs",
    "Metadata",
    "ParamInfo",
    "RestoreArgs",
    "SaveArgs",
    "ScalarHandler",
    "TypeHandler",
    "ValueMetadata",
    "get_type_handler",
    "has_type_handler",
    "register_type_handler",
]
