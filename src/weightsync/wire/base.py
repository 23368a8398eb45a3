"""The base of every answer model: a tolerant reader that writes only what is set."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)


class WireModel(BaseModel):
    """Unknown fields are kept (a client reading a newer server keeps working); fields named
    in `omit_if_none` are left out of the JSON when None (optional fields sent only when set).
    """

    model_config = ConfigDict(extra="allow")
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_optionals(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.omit_if_none:
                if name in data and data[name] is None:
                    del data[name]
        return data
