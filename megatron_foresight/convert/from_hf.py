"""A Hugging Face model directory (config.json + safetensors, sharded or not) -> a Megatron
distributed checkpoint at a chosen TP/PP size, and the recipe sections that describe it.

The conversion runs as TP x PP processes (started here on this machine, or by torchrun/srun):
each builds its own shard of the GPTModel exactly as training does, fills it from the
safetensors files one layer at a time, and all of them save one distributed checkpoint. Each
process holds its 1/(TP x PP) shard, one full layer at a time while filling, and only its own
rows of the embedding and output layer; what is written is what training loads. The processes
run on the CPU (gloo) even on a GPU machine: conversion needs no GPU, nor one per rank.

Output:

    OUT/checkpoints/step_0000000/   the distributed checkpoint (weights only)
    OUT/model.yaml                  model, parallel and tokenizer sections: a recipe's `base:`,
                                    with checkpoint.init_from pointing at OUT

The checkpoint is saved into a fresh hidden directory in OUT and swapped in for OUT/checkpoints
only once every process has saved (convert/replace.py): a failed `--overwrite` leaves the old
checkpoint as it was.
"""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import suppress
from pathlib import Path

import torch
import yaml

from megatron_foresight.config import RecipeConfig, recipe_from_tree
from megatron_foresight.convert import layout
from megatron_foresight.convert.hf_config import model_fields_from_hf, read_hf_config
from megatron_foresight.convert.replace import overlap, replace_dir, staging_dir
from megatron_foresight.convert.safetensors_io import SafetensorsDir
from megatron_foresight.data.tokenizer import HFTokenizer
from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


# The padding multiple must be divisible by every TP size the recipe will be run at; choosing
# it among the divisors of 2^7 * 3 * 5 * 7 keeps the common TP sizes (1-8, 12, 16, ...) open.
_TP_FRIENDLY = 128 * 3 * 5 * 7


def vocab_multiple(vocab: int, tp: int) -> int:
    """model.make_vocab_size_divisible_by for a Hugging Face vocabulary: a multiple that leaves
    `vocab` unpadded (so the embedding keeps exactly the Hugging Face rows) and divides by as
    many TP sizes as possible, `tp` among them; if none does, Megatron's usual 128 (times what
    `tp` needs), and the rows it adds are zeros."""
    multiple = math.gcd(vocab, _TP_FRIENDLY)
    if multiple % tp == 0:
        return multiple
    return math.lcm(128, tp)


def plan_conversion(hf_dir: Path, out: Path, tp: int, pp: int, tokenizer: str | None = None,
                    precision: str | None = None) -> RecipeConfig:
    """Validate everything that can be checked before starting processes; return the recipe the
    checkpoint will record."""
    hf_dir = Path(hf_dir).resolve()
    fields = model_fields_from_hf(read_hf_config(hf_dir), where=str(hf_dir / "config.json"))
    if precision:
        fields["precision"] = precision
    fields["make_vocab_size_divisible_by"] = vocab_multiple(fields["vocab_size"], tp)
    tokenizer_dir = Path(tokenizer).resolve() if tokenizer else hf_dir
    if not any((tokenizer_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UsageError(f"{tokenizer_dir}: no tokenizer.json or tokenizer_config.json; pass "
                         "--tokenizer DIR (a Hugging Face tokenizer directory) so the recipe "
                         "names the model's tokenizer")
    tree = {
        "model": fields,
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "data": {"seq_length": min(2048, fields["max_position_embeddings"]),
                 "tokenizer": {"type": "hf", "path": str(tokenizer_dir)}},
        "checkpoint": {"init_from": str(Path(out).resolve())},
    }
    cfg = recipe_from_tree(tree)
    cfg.check_world_size(tp * pp)
    tok = HFTokenizer(str(tokenizer_dir))
    if tok.vocab_size > fields["vocab_size"]:
        raise UsageError(f"{tokenizer_dir}: the tokenizer has {tok.vocab_size} tokens, more than "
                         f"the model's vocab_size ({fields['vocab_size']})")
    _check_tensors(SafetensorsDir(hf_dir), cfg.model)
    return cfg


def recipe_sections(cfg: RecipeConfig, hf_dir: Path) -> str:
    tree = cfg.to_dict()
    keep = {"model": tree["model"], "parallel": {k: tree["parallel"][k] for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size")},
        "data": {"seq_length": tree["data"]["seq_length"], "tokenizer": tree["data"]["tokenizer"]},
        "checkpoint": {"init_from": tree["checkpoint"]["init_from"]}}
    return (f"# Converted from {hf_dir} by `foresight convert from-hf`.\n"
            "# Use it as a recipe's `base:` (keys the recipe sets win); checkpoint.init_from\n"
            "# starts training from the converted weights.\n"
            + yaml.safe_dump(keep, sort_keys=False))


def convert_worker(hf_dir: str, staged: str | None, cfg_tree: dict) -> None:
    """One process of the conversion: build this rank's model shard, fill it, save it into the
    staging directory; `staged` is rank 0's choice (the other ranks may pass None)."""
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.runtime.dist import (
        barrier, broadcast_object, init_distributed, init_parallel_state, read_launch_env,
        shutdown,
    )
    from megatron_foresight.runtime.log import setup_logging
    from megatron_foresight.training import checkpoint as ckpt

    cfg = recipe_from_tree(cfg_tree)
    launch = read_launch_env()
    setup_logging(launch.rank)
    device = init_distributed(launch)
    try:
        staged = broadcast_object(staged)
        ctx = init_parallel_state(cfg.parallel, device)
        m = cfg.model
        padded = cfg.padded_vocab_size(m.vocab_size)
        chunks = build_model(cfg, padded, ctx.pg_collection, initialize=False)
        source = SafetensorsDir(Path(hf_dir))
        with torch.no_grad():
            for chunk in chunks:
                fill_from_hf(chunk, source, m, padded, show_progress=ctx.rank == 0)
        barrier()
        ckpt.save_checkpoint(Path(staged), 0, chunks=chunks, optimizer=None, scheduler=None,
                             ctx=ctx, consumed_samples=0, config=cfg.to_dict(), keep_last=1,
                             save_optimizer=False)
    finally:
        shutdown()


def _check_tensors(source: SafetensorsDir, m) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is: checked
    from the file headers here, once, so a bad directory is one clear error, not a failure
    inside every worker."""
    expected = layout.hf_shapes(m)
    names = {n for n in source.names() if not n.endswith(_IGNORED_SUFFIXES)}
    if not m.untie_embeddings_and_output_weights:
        names.discard("lm_head.weight")  # tied: some checkpoints store the copy anyway
    missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        raise UsageError(f"{source.dir}: missing tensors {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''} (config.json says "
                         f"{m.num_layers} layers, {m.family})")
    if unknown:
        raise UsageError(f"{source.dir}: tensors with no place in a {m.family} GPTModel: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    stored = source.shapes()
    for name, shape in expected.items():
        if stored[name] != shape:
            raise UsageError(f"{source.dir / source.weight_map[name]}: tensor {name} has shape "
                             f"{list(stored[name])}, config.json implies {list(shape)}; the "
                             "weights do not belong to this config.json (check that both come "
                             "from the same model)")


def fill_from_hf(chunk, source: SafetensorsDir, m, padded_vocab: int,
                 show_progress: bool = False) -> None:
    """Copy Hugging Face tensors into this rank's parameters of one model chunk.

    The chunk's own sharded state dict says, for every parameter (and, through the SwiGLU
    factory, for each half of fc1), which box of the tensor-parallel-1 tensor it holds and for
    which global layer; the full tensor is built from Hugging Face's for one layer at a time and
    the box copied out. The same code serves any TP/PP/VPP layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from tqdm import tqdm

    boxes = []
    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            boxes += [t for t in nested_values(item.build()) if isinstance(t, ShardedTensor)]
        elif isinstance(item, ShardedTensor):
            boxes.append(item)
    by_layer: dict[int | None, list] = {}
    for box in boxes:
        layer = box.global_offset[0] if box.key.startswith(layout.LAYERS) else None
        by_layer.setdefault(layer, []).append(box)

    names = layout.hf_global_names(m)
    # tied: the last stage's copy of the output layer comes from the embedding
    globals_ = {**names, layout.OUTPUT: names.get(layout.OUTPUT, names[layout.EMBEDDING])}
    layers = sorted(k for k in by_layer if k is not None)
    for layer in tqdm(layers, desc="from-hf", unit="layer", disable=None if show_progress else True):
        prefix = layout.hf_layer_prefix(layer)
        full = layout.layer_from_hf({n: source.get(prefix + n) for n in layout.hf_layer_names(m)},
                                    m)
        for box in by_layer[layer]:
            _copy_box(box, full[box.key[len(layout.LAYERS):]])
    for box in by_layer.get(None, []):
        if box.key not in globals_:
            raise RuntimeError(f"no Hugging Face tensor for {box.key}")
        if box.key in (layout.EMBEDDING, layout.OUTPUT):
            _copy_vocab_rows(box, source, globals_[box.key])
        else:
            _copy_box(box, source.get(globals_[box.key]))


def _copy_vocab_rows(box, source: SafetensorsDir, name: str) -> None:
    """This rank's rows of the (vocabulary-parallel) embedding or output layer, read alone;
    rows past the Hugging Face vocabulary (Megatron's padding) are zeros."""
    (start, col), (rows, width) = box.global_offset[box.prepend_axis_num:], box.local_shape
    vocab = source.shape(name)[0]
    box.data.zero_()
    have = max(0, min(start + rows, vocab) - start)
    if have:
        box.data[:have].copy_(source.get_rows(name, start, start + have)[:, col:col + width])


def _copy_box(box, full: torch.Tensor) -> None:
    offsets = box.global_offset[box.prepend_axis_num:]
    index = tuple(slice(o, o + n) for o, n in zip(offsets, box.local_shape))
    part = full[index]
    if tuple(part.shape) != tuple(box.data.shape):
        raise RuntimeError(f"{box.key}: Hugging Face tensor {tuple(full.shape)} does not hold the "
                           f"box {index} of shape {tuple(box.data.shape)}")
    box.data.copy_(part)


def convert_from_hf(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                    tokenizer: str | None = None, precision: str | None = None,
                    overwrite: bool = False) -> Path:
    from megatron_foresight.runtime.dist import read_launch_env, spawn_local

    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    cfg = plan_conversion(hf_dir, out, tp, pp, tokenizer, precision)  # reads only
    _check_out(hf_dir, out, overwrite)
    launch = read_launch_env()
    spawn = launch.launcher == "single" and tp * pp > 1
    if not spawn and launch.world_size != tp * pp:
        raise UsageError(f"launched on {launch.world_size} processes; the conversion to "
                         f"--tp {tp} --pp {pp} runs on exactly {tp * pp}")
    if launch.rank != 0:  # rank 0 chooses the staging directory and swaps it in
        convert_worker(str(hf_dir), None, cfg.to_dict())
        return out
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(out / "checkpoints")
    try:
        args = (str(hf_dir), str(staged), cfg.to_dict())
        if spawn:
            spawn_local(tp * pp, convert_worker, *args, cpu_only=True)
        else:
            convert_worker(*args)
        replace_dir(staged, out / "checkpoints")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        if created:
            with suppress(OSError):  # only if empty: another process may have written there
                out.rmdir()
        raise
    (out / "model.yaml").write_text(recipe_sections(cfg, hf_dir))
    log.info("wrote %s (TP=%d, PP=%d) and %s", out / "checkpoints", tp, pp, out / "model.yaml")
    return out


def _check_out(hf_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out this conversion could not replace without harm: the model it reads, a
    training run, or (without --overwrite) an earlier conversion."""
    if overlap(hf_dir, out):
        raise UsageError(f"--out {out} and --hf-dir {hf_dir} are the same directory or one is "
                         "inside the other; write the checkpoint to a directory outside the "
                         "Hugging Face model directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; give a directory")
    existing = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    if existing and existing != ["step_0000000"]:
        raise UsageError(f"--out {out} holds training checkpoints ({', '.join(existing)}); "
                         "convert into another directory")
    if existing and not overwrite:
        raise UsageError(f"--out {out} already holds a converted checkpoint; pass "
                         "--overwrite to replace it")
