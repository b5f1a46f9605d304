"""Training: objectives, the loop and its operational components."""
