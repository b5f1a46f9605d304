"""The model run in the generated world and measured against the simulator's truth (docs/DESIGN.md,
"Evaluation"): open-loop tasks, closed-loop episodes and the report with its oracle and chance rows.
The ``cosmos3-eval`` command and the trainer's periodic eval both run this suite."""
