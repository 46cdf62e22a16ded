"""Faults a tester found in `foresight convert`: conversions that destroyed the data they read or
the checkpoint they were to replace, and bad inputs that ended in a traceback. Each test
checks the real outcome: the files on disk (hashed before and after), what is left beside the
output, and the one-line error the command prints."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap

import pytest
import torch

from helpers.run import foresight, python
from megatron_foresight.runtime.run_lock import LOCK_NAME
from test_convert import make_hf_model, safetensors_dir

HF_MODEL = dict(model_type="llama", num_key_value_heads=2)


def tree_hash(root) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes), but the run lock the
    command line takes while it converts from or into a run (runtime/run_lock.py)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def listing(directory) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name != LOCK_NAME}


def to_hf_tensors(ckpt, out) -> dict[str, torch.Tensor]:
    from megatron_foresight.convert.to_hf import convert_to_hf

    convert_to_hf(ckpt, out)
    return safetensors_dir(out)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def fails_with_one_line(args: list, *expected: str) -> str:
    """Runs the real command line; it must exit 2 with one `error:` line naming `expected`."""
    proc = foresight(["convert", *map(str, args)], check=False)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    for part in expected:
        assert str(part) in line, (part, line)
    return line


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(out, **HF_MODEL)
    return out


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """`from-hf` of `hf_model`: OUT/checkpoints/step_0000000 and OUT/model.yaml."""
    out = tmp_path_factory.mktemp("converted") / "mg"
    foresight(["convert", "from-hf", "--hf-dir", str(hf_model), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def two_step_run(converted, tmp_path_factory):
    """A run directory as training leaves it: two checkpoints, `latest` naming the second."""
    run = tmp_path_factory.mktemp("two-step") / "run"
    shutil.copytree(converted, run)
    shutil.copytree(run / "checkpoints" / "step_0000000", run / "checkpoints" / "step_0000001")
    (run / "checkpoints" / "latest").write_text("step_0000001\n")
    return run


# ---- fault 1: from-hf --overwrite deleted the old checkpoint before converting ----------------

@pytest.mark.slow
def test_from_hf_overwrite_with_bad_input_keeps_the_old_checkpoint(hf_model, converted,
                                                                   tmp_path):
    out = shutil.copytree(converted, tmp_path / "mg")
    before = tree_hash(out)
    bad = shutil.copytree(hf_model, tmp_path / "bad")
    from safetensors.torch import load_file, save_file
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(150, 64)
    save_file(weights, bad / "model.safetensors")

    fails_with_one_line(["from-hf", "--hf-dir", bad, "--out", out, "--overwrite"],
                        "model.layers.1.mlp.up_proj.weight", "[150, 64]", "[160, 64]")
    assert tree_hash(out) == before
    assert listing(tmp_path) == {"mg", "bad"}
    assert_same_tensors(to_hf_tensors(out, tmp_path / "back"), safetensors_dir(hf_model))


@pytest.mark.slow
def test_from_hf_overwrite_that_crashes_while_saving_keeps_the_old_checkpoint(hf_model,
                                                                              converted,
                                                                              tmp_path):
    """A failure inside the conversion itself (here: the save, after writing part of the
    checkpoint) leaves the old checkpoint whole and no staging directory behind."""
    out = shutil.copytree(converted, tmp_path / "mg")
    before = tree_hash(out)
    crash = textwrap.dedent("""
        import sys
        from megatron_foresight.cli import main
        from megatron_foresight.training import checkpoint

        def save_then_crash(root, step, **kw):
            (root / "step_0000000.tmp").mkdir()
            (root / "step_0000000.tmp" / "__0_0.distcp").write_bytes(b"part")
            raise RuntimeError("No space left on device")

        checkpoint.save_checkpoint = save_then_crash
        sys.exit(main(sys.argv[1:]))
    """)
    proc = python(["-c", crash, "convert", "from-hf", "--hf-dir", str(hf_model), "--out",
                   str(out), "--overwrite"], check=False)
    assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr
    assert tree_hash(out) == before
    assert listing(out) == {"checkpoints", "model.yaml"} and listing(tmp_path) == {"mg"}


@pytest.mark.slow
def test_from_hf_overwrite_under_torchrun_swaps_in_the_new_checkpoint(converted, tmp_path):
    """Two ranks (TP=2) under torchrun: rank 0 picks the staging directory, both save into it,
    rank 0 swaps it in; the old checkpoint is gone and nothing else is left."""
    other = tmp_path / "other"
    make_hf_model(other, **HF_MODEL, seed=1)
    out = shutil.copytree(converted, tmp_path / "mg")
    foresight(["convert", "from-hf", "--hf-dir", str(other), "--out", str(out), "--tp", "2",
               "--overwrite"], nproc=2)
    assert listing(out) == {"checkpoints", "model.yaml"}
    assert listing(out / "checkpoints") == {"latest", "step_0000000"}
    assert listing(tmp_path) == {"other", "mg"}
    assert "tensor_model_parallel_size: 2" in (out / "model.yaml").read_text()
    assert_same_tensors(to_hf_tensors(out, tmp_path / "back"), safetensors_dir(other))


# ---- fault 2: to-hf replaced or deleted the checkpoint it was converting ----------------------

@pytest.mark.slow
@pytest.mark.parametrize("ckpt,out,overwrite", [
    (".", "checkpoints/step_0000000", True),  # an older step of the run being converted
    ("checkpoints/step_0000001", "checkpoints/step_0000000", True),
    (".", "checkpoints", True),
    (".", ".", True),
    (".", "hf", False),  # inside the run
    ("checkpoints", "checkpoints/hf", False),
    ("checkpoints/step_0000001", "checkpoints/step_0000001/hf", False),
])
def test_to_hf_refuses_an_out_in_or_around_the_run_it_reads(two_step_run, ckpt, out, overwrite):
    from megatron_foresight.convert.to_hf import convert_to_hf
    from megatron_foresight.errors import UsageError

    ckpt, out = two_step_run / ckpt, two_step_run / out
    before, around = tree_hash(two_step_run), listing(two_step_run.parent)
    with pytest.raises(UsageError) as refused:
        convert_to_hf(ckpt, out, overwrite=overwrite)
    message = str(refused.value)
    assert str(out.resolve()) in message and "choose a directory outside" in message, message
    assert str(two_step_run / "checkpoints") in message, message  # names what it reads
    assert tree_hash(two_step_run) == before and listing(two_step_run.parent) == around


@pytest.mark.slow
def test_to_hf_overwrite_refuses_to_replace_another_run(converted, tmp_path):
    from megatron_foresight.convert.to_hf import convert_to_hf
    from megatron_foresight.errors import UsageError

    other = shutil.copytree(converted, tmp_path / "other-run")
    before = tree_hash(other)
    with pytest.raises(UsageError, match="holds a Megatron checkpoint or training run"):
        convert_to_hf(converted, other, overwrite=True)
    assert tree_hash(other) == before and listing(tmp_path) == {"other-run"}


@pytest.mark.slow
@pytest.mark.parametrize("suffix,overwrite", [(".tmp", False), (".old", True)])
def test_to_hf_never_deletes_a_source_named_like_its_temporaries(hf_model, converted, tmp_path,
                                                                 suffix, overwrite):
    """`--ckpt X.tmp --out X` and `--ckpt X.old --out X --overwrite`: the names the command once
    used for its own temporary and aside directories."""
    from megatron_foresight.convert.to_hf import convert_to_hf

    source = shutil.copytree(converted, tmp_path / f"X{suffix}")
    before = tree_hash(source)
    out = tmp_path / "X"
    if overwrite:
        out.mkdir()
        (out / "stale.txt").write_text("an earlier export")
    convert_to_hf(source, out, overwrite=overwrite)
    assert tree_hash(source) == before
    assert listing(tmp_path) == {"X", f"X{suffix}"}
    assert "stale.txt" not in listing(out) and (out / "config.json").exists()
    assert_same_tensors(safetensors_dir(out), safetensors_dir(hf_model))


@pytest.mark.parametrize("inside", ["out", "hf_dir", "same"])
def test_from_hf_refuses_out_and_hf_dir_inside_each_other(hf_model, tmp_path, inside):
    from megatron_foresight.convert.from_hf import convert_from_hf
    from megatron_foresight.errors import UsageError

    hf_dir = shutil.copytree(hf_model, tmp_path / "hf")
    out = {"out": hf_dir / "mg", "hf_dir": tmp_path, "same": hf_dir}[inside]
    before = tree_hash(tmp_path)
    with pytest.raises(UsageError) as refused:
        convert_from_hf(hf_dir, out)
    message = str(refused.value)
    assert str(out) in message and str(hf_dir) in message, message
    assert tree_hash(tmp_path) == before and listing(tmp_path) == {"hf"}


# ---- fault 3: bad inputs gave a traceback, not one line naming the file -----------------------

def _wrong_shape(hf_dir):
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, hf_dir / "model.safetensors")
    return hf_dir / "model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[64, 64]", \
        "[32, 64]"


def _garbage(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"<html><body>502 Bad Gateway</body></html>\n")
    return hf_dir / "model.safetensors", "not a readable safetensors file"


def _index_lists_a_missing_tensor(hf_dir):
    """Two shards and their index; the second shard lacks a tensor the index places there."""
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part if n != "model.norm.weight"}, hf_dir / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return hf_dir / weight_map["model.norm.weight"], "no tensor model.norm.weight"


@pytest.mark.parametrize("damage", [_wrong_shape, _garbage, _index_lists_a_missing_tensor])
def test_from_hf_bad_weights_are_refused_naming_the_file(hf_model, tmp_path, damage):
    """Refused before any process starts (in process here, to stay fast; the command line's
    one-line form of the same error is checked with the first test of fault 1)."""
    from megatron_foresight.convert.from_hf import convert_from_hf
    from megatron_foresight.errors import UsageError

    hf_dir = shutil.copytree(hf_model, tmp_path / "hf")
    expected = damage(hf_dir)
    with pytest.raises(UsageError) as refused:
        convert_from_hf(hf_dir, tmp_path / "mg")
    for part in expected:
        assert str(part) in str(refused.value), (part, str(refused.value))
    assert listing(tmp_path) == {"hf"}


@pytest.mark.slow
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "saved-before-manifests"])
def test_to_hf_from_a_truncated_checkpoint_is_one_line_naming_the_file(converted, tmp_path,
                                                                      manifest):
    from megatron_foresight.training.integrity import MANIFEST

    run = shutil.copytree(converted, tmp_path / "run")
    step = run / "checkpoints" / "step_0000000"
    if not manifest:
        (step / MANIFEST).unlink()
    data = sorted(step.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    fails_with_one_line(["to-hf", "--ckpt", run, "--out", tmp_path / "hf"], data, "truncated")
    assert listing(tmp_path) == {"run"}
