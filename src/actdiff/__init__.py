"""actdiff: activation-level diff of a reference transformer against an inference engine."""

from ._version import __version__

__all__ = ["__version__"]
