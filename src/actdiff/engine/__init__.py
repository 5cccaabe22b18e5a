"""The actdiff inference engine: the other side of every comparison (no torch on this path)."""
