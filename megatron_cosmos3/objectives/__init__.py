"""The objectives: next-token cross-entropy, flow matching and their per-task breakdown.

Below ``parallel/``: the parallel drivers receive a loss function from here and import nothing from
``training/`` (docs/DESIGN.md, "Layers").
"""
