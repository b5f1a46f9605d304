import sys
from pathlib import Path

# The tiny random Qwen3-VL of the conversion tests (and its fixtures): the reference of text generation.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conversion"))

from qwen3_vl_tiny import hf_folder, hf_model  # noqa: E402, F401  (fixtures)
