"""SmolLM2-135M-Instruct for the tests, built by the package's builder
(`megatron_foresight.convert.smollm2`, which `tools/build_smollm2.py` runs for users).

    python tests/helpers/smollm2.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_foresight.convert.smollm2 import build_hf_dir, build_tokenizer_dir

__all__ = ["build_hf_dir", "build_tokenizer_dir"]

if __name__ == "__main__":
    print(build_hf_dir(Path(sys.argv[1])))
