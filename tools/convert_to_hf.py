#!/usr/bin/env python
"""`foresight convert to-hf`: see `python tools/convert_to_hf.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_foresight.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
