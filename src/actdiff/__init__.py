"""actdiff: activation-level diff of a reference transformer against an inference engine."""

from ._version import __version__


def load(model, side: str = "reference", variant: str = "fp32", **options):
    """A model on one side, for ``encode(texts)`` and ``nodes(texts or ids)``: see :func:`actdiff.api.load`.
    Imported on call, so ``import actdiff`` stays light (no torch, no kernels)."""
    from .api import load as _load

    return _load(model, side, variant, **options)


__all__ = ["__version__", "load"]
