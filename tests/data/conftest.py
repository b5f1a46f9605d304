import sys
from pathlib import Path

# data_pipelines/ is a folder of operator scripts, not part of the installed package: the generated
# world's package sits beside them. On sys.path before any test module here is imported, so a module
# that imports it works alone, in any order.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data_pipelines"))
