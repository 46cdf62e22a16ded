"""`model.precision: auto` (runtime/precision.py): the decision rule, the per-machine cache of the
probe's figures, and that the choice is made once, before the model is built, and kept on resume.
No test here times a real matmul: each replaces `precision.measure` (the probe's timing) or seeds
the cache, so the outcome does not depend on this machine's CPU."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from helpers.run import REPO, TEST_RECIPE, train

from megatron_foresight.config import ModelConfig, load_recipe
from megatron_foresight.runtime import precision
from megatron_foresight.training import checkpoint as ckpt

LM_RECIPE = REPO / "recipes" / "tiny-cpu" / "lm.yaml"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache file of this test alone (FORESIGHT_CACHE_DIR in a tmp dir)."""
    monkeypatch.setenv("FORESIGHT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / precision.CACHE_FILE


@pytest.fixture
def timings(monkeypatch):
    """Replaces the probe's timing with figures the test sets: (fp32 ms, bf16 ms) per call."""
    calls = []

    class Fake:
        figures = (20.0, 8.0)

        def __call__(self, shapes, repeats=precision.PROBE_REPEATS):
            calls.append(shapes)
            return self.figures

        @property
        def calls(self):
            return len(calls)

    fake = Fake()
    monkeypatch.setattr(precision, "measure", fake)
    return fake


def _cfg(*overrides):
    return load_recipe(LM_RECIPE, ["model.precision=auto", *overrides])


# --------------------------------------------------------------------------------------------
# the decision rule and the probe's shapes


@pytest.mark.parametrize("fp32_ms,bf16_ms,expected", [
    (19.2, 6.5, "bf16"),   # the AMD EPYC of issue 20: bf16 ~3x faster
    (16.0, 23.5, "fp32"),  # the Intel Xeon of issue 20: bf16 slower despite AVX-512 BF16
    (10.5, 10.0, "fp32"),  # 1.05x: a near tie goes to fp32, the exact one
    (11.0, 10.0, "bf16"),  # exactly BF16_MIN_SPEEDUP
    (10.0, 0.0, "fp32"),   # a nonsense timing never picks bf16
])
def test_choose_takes_bf16_only_when_faster_by_the_margin(fp32_ms, bf16_ms, expected):
    assert precision.BF16_MIN_SPEEDUP == 1.1
    assert precision.choose(fp32_ms, bf16_ms) == expected


def test_probe_shapes_are_the_models_own_matmuls_split_by_tp():
    shapes = precision.probe_shapes(_cfg("model.vocab_size=1000"))
    dims = {p.name: (p.fan_in, p.fan_out, p.uses) for p in shapes.projections}
    # tiny: hidden 256, 8 heads of 32, 2 KV groups, SwiGLU ffn 704 (two branches), 4 layers;
    # the vocabulary padded to a multiple of 128
    assert dims == {"qkv": (256, 256 + 2 * 2 * 32, 4), "proj": (256, 256, 4),
                    "fc1": (256, 2 * 704, 4), "fc2": (704, 256, 4), "output": (256, 1024, 1)}
    cfg = _cfg()
    wanted = cfg.schedule.micro_batch_size * cfg.data.seq_length  # a microbatch's tokens
    assert shapes.tokens % 16 == 0
    assert precision.MIN_TOKENS <= shapes.tokens <= min(precision.MAX_TOKENS, wanted)
    tp2 = {p.name: (p.fan_in, p.fan_out) for p in precision.probe_shapes(
        _cfg("model.vocab_size=1000", "parallel.tensor_model_parallel_size=2")).projections}
    assert tp2 == {"qkv": (256, 192), "proj": (128, 256), "fc1": (256, 704), "fc2": (352, 256),
                   "output": (256, 512)}
    # without a vocabulary size (the tokenizer sets it later) the output layer is left out
    assert "output" not in {p.name for p in precision.probe_shapes(_cfg()).projections}


def test_probe_of_wide_shapes_stays_within_its_budget():
    """A large vocabulary is timed on MAX_WIDTH columns and scaled; tokens shrink so one pass
    stays near PROBE_MACS, but never below MIN_TOKENS."""
    cfg = _cfg("model.vocab_size=128000", "model.hidden_size=2048", "model.ffn_hidden_size=8192",
               "model.num_attention_heads=16", "data.seq_length=1024")
    shapes = precision.probe_shapes(cfg)
    output = next(p for p in shapes.projections if p.name == "output")
    assert output.timed() == (precision.MAX_WIDTH, 128000 / precision.MAX_WIDTH)
    macs = shapes.tokens * sum(p.fan_in * p.timed()[0] for p in shapes.projections)
    assert shapes.tokens == precision.MIN_TOKENS or macs <= precision.PROBE_MACS


def test_measure_times_both_dtypes_on_tiny_shapes():
    """The real timing function, on shapes small enough to be instant: two positive medians."""
    shapes = precision.ProbeShapes(16, (precision.Projection("a", 8, 8, 2),))
    fp32_ms, bf16_ms = precision.measure(shapes, repeats=1)
    assert fp32_ms > 0 and bf16_ms > 0


# --------------------------------------------------------------------------------------------
# the cache


def test_cache_round_trip_measures_once_per_machine_and_shape(cache, timings):
    cfg = _cfg()
    first = precision.decide(cfg)
    assert (first.precision, first.source, timings.calls) == ("bf16", "measured", 1)
    assert (first.fp32_ms, first.bf16_ms) == (20.0, 8.0)
    stored = json.loads(cache.read_text())
    assert stored["version"] == precision.CACHE_VERSION
    (key, entry), = stored["probes"].items()
    assert precision.cpu_name() in key and torch.__version__ in key
    assert (entry["fp32_ms"], entry["bf16_ms"]) == (20.0, 8.0)
    assert not list(cache.parent.glob("*.tmp"))  # written through a renamed temporary file

    timings.figures = (1.0, 100.0)  # what a second probe would say: never asked
    again = precision.decide(cfg)
    assert (again.precision, again.source, timings.calls) == ("bf16", "cached", 1)
    assert "from the cache" in again.describe() and "2.50x" in again.describe()


def test_cache_key_changes_with_shapes_and_threads(cache, timings, monkeypatch):
    precision.decide(_cfg())
    precision.decide(_cfg("data.seq_length=64"))  # other tokens per microbatch
    assert timings.calls == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert precision.decide(_cfg()).source == "measured"
    assert timings.calls == 3
    assert len(json.loads(cache.read_text())["probes"]) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "probes": {}}'],
                         ids=["not_json", "not_a_dict", "other_version"])
def test_corrupt_cache_is_ignored_with_a_warning_and_replaced(cache, timings, caplog, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    with caplog.at_level(logging.WARNING, logger="megatron_foresight"):
        choice = precision.decide(_cfg())
    assert (choice.precision, choice.source) == ("bf16", "measured")
    assert "ignoring the precision cache" in caplog.text
    assert len(json.loads(cache.read_text())["probes"]) == 1  # a valid file again


def test_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, timings, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FORESIGHT_CACHE_DIR", str(blocker / "cache"))  # under a file
    with caplog.at_level(logging.WARNING, logger="megatron_foresight"):
        assert precision.decide(_cfg()).precision == "bf16"
    assert "cannot write the precision cache" in caplog.text


def test_failed_probe_falls_back_to_fp32(cache, monkeypatch, caplog):
    def broken(shapes, repeats=precision.PROBE_REPEATS):
        raise RuntimeError("no bf16 kernel")
    monkeypatch.setattr(precision, "measure", broken)
    with caplog.at_level(logging.WARNING, logger="megatron_foresight"):
        choice = precision.decide(_cfg())
    assert (choice.precision, choice.source) == ("fp32", "fallback")
    assert "no bf16 kernel" in caplog.text


def test_cache_dir_defaults_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FORESIGHT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert precision.cache_path() == tmp_path / ".cache" / "megatron-foresight" / "precision.json"
    monkeypatch.setenv("FORESIGHT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert precision.cache_path() == tmp_path / "elsewhere" / "precision.json"


def test_the_suite_never_writes_to_the_home_cache():
    """tests/conftest.py points FORESIGHT_CACHE_DIR at a tmp dir for the whole session."""
    assert Path(os.environ["FORESIGHT_CACHE_DIR"]).resolve() != \
        (Path.home() / ".cache" / "megatron-foresight").resolve()


# --------------------------------------------------------------------------------------------
# resolving the recipe


def test_auto_is_bf16_on_mocked_cuda_without_a_probe(cache, timings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg()
    choice = precision.resolve(cfg)
    assert (choice.precision, choice.source) == ("bf16", "cuda")
    assert cfg.model.precision == "bf16" and timings.calls == 0 and not cache.exists()
    assert "CUDA" in choice.describe()


def test_resolve_leaves_a_named_precision_alone(cache, timings):
    cfg = load_recipe(LM_RECIPE, ["model.precision=bf16"])
    assert precision.resolve(cfg) is None
    assert cfg.model.precision == "bf16" and cfg.model.precision_choice is None
    assert timings.calls == 0


def test_auto_is_a_recipe_value_and_fp8_accepts_it():
    assert _cfg().model.precision == "auto"
    assert _cfg().to_dict()["model"]["precision"] == "auto"
    assert "precision_choice" not in _cfg().to_dict()["model"]
    ModelConfig(precision="auto", fp8="hybrid")  # auto is bf16 on CUDA, where FP8 runs
    with pytest.raises(Exception, match="set model.precision: bf16"):
        ModelConfig(precision="fp32", fp8="hybrid")


@pytest.mark.parametrize("fp32_ms,bf16_ms,dtype", [(20.0, 8.0, torch.bfloat16),
                                                   (8.0, 20.0, torch.float32)])
def test_auto_builds_the_chosen_dtype_with_only_the_timing_monkeypatched(
        megatron_cpu, cache, timings, fp32_ms, bf16_ms, dtype):
    """What start_processes does before any model exists: resolve, then build from the recipe."""
    from megatron_foresight.models.provider import build_model

    timings.figures = (fp32_ms, bf16_ms)
    cfg = _cfg()
    precision.resolve(cfg)
    (model,) = build_model(cfg, 384, megatron_cpu.pg_collection)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert cfg.to_dict()["model"]["precision"] == {torch.bfloat16: "bf16",
                                                   torch.float32: "fp32"}[dtype]


def test_adopting_the_checkpoints_precision_only_for_auto(cache, timings):
    cfg = _cfg()
    precision.resolve(cfg)  # bf16
    precision.adopt_checkpoint_precision(cfg, "fp32", "run")
    assert cfg.model.precision == "fp32" and cfg.model.precision_choice.source == "checkpoint"
    assert "to match the checkpoint resumed" in cfg.model.precision_choice.note()
    named = load_recipe(LM_RECIPE, ["model.precision=bf16"])
    precision.adopt_checkpoint_precision(named, "fp32", "run")
    assert named.model.precision == "bf16"  # the user's own choice is checked on load instead


def test_resuming_in_another_precision_is_refused_in_one_line(tmp_path):
    common = {"config": {"model": {"precision": "bf16"}}}
    ckpt._check_precision(tmp_path, common, "bf16")
    ckpt._check_precision(tmp_path, {"config": {}}, "fp32")  # an older checkpoint: not known
    with pytest.raises(ckpt.CheckpointError, match="saved with model.precision=bf16 and this "
                                                   "run has fp32"):
        ckpt._check_precision(tmp_path, common, "fp32")


def _seed_cache(cache, cfg, threads: int, fp32_ms: float, bf16_ms: float) -> None:
    key = precision.cache_key(precision.cpu_name(), threads, precision.probe_shapes(cfg))
    precision.write_cache(cache, key, {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms})


def _weights_dtype(step) -> torch.dtype:
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    return meta["embedding.word_embeddings.weight"].properties.dtype


@pytest.mark.slow
def test_train_with_auto_records_the_choice_and_resume_keeps_it(cache, data_cache, tmp_path):
    """The real command line, one process: the seeded cache says fp32 (the probe is not run),
    config.yaml and the checkpoint record fp32; then the cache says bf16, and --resume keeps
    fp32, since optimizer state does not convert."""
    overrides = ["model.precision=auto", "schedule.train_steps=1", "schedule.warmup_steps=0",
                 f"data.cache_dir={data_cache}"]
    cfg = load_recipe(TEST_RECIPE, overrides)
    env = {"OMP_NUM_THREADS": "1"}  # the thread count of the key seeded
    _seed_cache(cache, cfg, 1, fp32_ms=8.0, bf16_ms=20.0)
    run_dir = tmp_path / "run"
    out = train(run_dir, overrides, env=env).stdout
    assert "model.precision=auto: fp32 (from the cache" in out, out
    config = (run_dir / "config.yaml").read_text()
    assert "# model.precision: auto in the recipe; fp32 by a cached probe" in config
    assert "\n  precision: fp32\n" in config
    step = ckpt.find_checkpoint(run_dir)
    assert ckpt.read_common(step)["config"]["model"]["precision"] == "fp32"
    assert _weights_dtype(step) == torch.float32

    _seed_cache(cache, cfg, 1, fp32_ms=20.0, bf16_ms=8.0)  # this machine would now pick bf16
    out = train(run_dir, [*overrides, "schedule.train_steps=2"], extra=["--resume"],
                env=env).stdout
    assert "model.precision=auto: bf16 (from the cache" in out, out
    assert "model.precision=auto: fp32, the precision of the checkpoints resumed" in out
    assert "resumed from" in out
    assert _weights_dtype(ckpt.find_checkpoint(run_dir)) == torch.float32
