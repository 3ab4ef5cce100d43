"""The supervisor: never imports torch (checked by a test)."""

from .command import build_command
from .loop import supervise
from .spec import RunSpec, build_spec

__all__ = ["RunSpec", "build_command", "build_spec", "supervise"]
