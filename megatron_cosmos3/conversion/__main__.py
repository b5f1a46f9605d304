"""``python -m megatron_cosmos3.conversion``: the ``cosmos3-convert`` command. It lives in
``release/convert_cli.py`` because exporting a trained checkpoint needs the checkpoint reader, a
layer above this package; this entry point only forwards to it (docs/DESIGN.md, "Layers")."""

import sys

from megatron_cosmos3.release.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
