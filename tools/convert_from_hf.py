#!/usr/bin/env python
"""`foresight convert from-hf`: see `python tools/convert_from_hf.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_foresight.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "from-hf", *sys.argv[1:]]))
