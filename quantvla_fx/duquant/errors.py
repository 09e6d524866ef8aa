"""PackError: a DuQuant pack is missing, malformed or does not fit the model.

Lives in its own module so the transform can raise it without importing the pack readers.
"""
from __future__ import annotations

from typing import Optional


class PackError(ValueError):
    """A pack problem; the message names the file, the layer FQN(s) and the field."""

    def __init__(self, message: str, *, file: Optional[str] = None, fqn: Optional[str] = None,
                 field: Optional[str] = None):
        super().__init__(message)
        self.file, self.fqn, self.field = file, fqn, field

    @classmethod
    def at(cls, file: str, fqn: str, field: str, problem: str) -> "PackError":
        return cls(f"{file}: layer {fqn}: field '{field}': {problem}", file=file, fqn=fqn, field=field)
