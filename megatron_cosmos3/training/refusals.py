"""Start-up refusals: a setting this machine or launch cannot honour (fp8 without CUDA and
Transformer Engine, a profiled rank outside the world, a model larger than the host's memory, a
run folder another trainer holds), found on every rank alike before any step. ``cosmos3-train``
prints one as it prints a config error (docs/DESIGN.md, "Command-line errors"); an error while
training stays a traceback."""

from __future__ import annotations


class StartupRefusal(ValueError):
    """This run cannot start on this machine; the message names the field and its value."""
