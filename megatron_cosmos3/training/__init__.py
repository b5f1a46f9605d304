"""Training: the loop (``train.py``) and its operational components — config tree, micro-batches,
metrics, FLOPs, precision, preemption, learning-rate schedule, MLflow tracking, generation samples.
The layout and its drivers belong to ``parallel.plan``; objectives to ``objectives``; checkpoints
to ``checkpoint`` (docs/DESIGN.md)."""
