"""Metrics where the generated world gives the truth (docs/DESIGN.md, "Evaluation"): frames, ball
positions, sound onsets, actions, closed-loop success, answers and text->video objects, and the
report that puts every value beside its oracle and chance rows."""
