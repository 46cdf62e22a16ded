#!/usr/bin/env python
"""`foresight data preprocess`: see `python tools/preprocess_data.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_foresight.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "preprocess", *sys.argv[1:]]))
