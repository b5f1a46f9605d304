"""Parallelism applied to a built model: sizes and process groups, TP/SP, PP, EP, CP, DP."""
