"""The generated world: a 1 m box of bouncing balls pushed by embodiments, rendered, heard and
described from one simulation (docs/DESIGN.md, "The generated world")."""
