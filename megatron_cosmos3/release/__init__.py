"""What leaves a training run: a trained checkpoint loaded for generation in one process or under
tensor parallelism (``trained``), its release export (``export``), and the ``cosmos3-convert``
command (``convert_cli``); docs/DESIGN.md, "Release"."""
