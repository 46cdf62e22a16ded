import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real command line "
                                       "(several processes); CI runs them too")


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
