"""Parallelism applied to a built model: sizes and process groups, TP/SP, PP, EP, CP, DP, and the
``ParallelPlan`` (``plan.py``) that applies a layout and drives micro-batches through it."""
