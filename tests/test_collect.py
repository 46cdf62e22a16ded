"""`foresight data collect`: a policy's episodes as trajectories with Monte-Carlo estimates.

The estimates are checked against the continuations actually played, with a scripted policy
in place of the model (its outcomes vary, so the counts mean something); the command itself
runs the real Megatron model (a tiny checkpoint trained here with the world's tokenizer, whose
episodes fail: it writes no actions) on the small world, two turns per episode."""

import json
import random
import shutil
from pathlib import Path

import pytest

from helpers.run import REPO, TEST_RECIPE, foresight, train
from megatron_foresight.cli import main
from megatron_foresight import collect
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.data.trajectory import read_trajectories
from megatron_foresight.envs.math import MathEnv
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.formats import FORMATS
from megatron_foresight.inference.generate import Completion, Sampling
from megatron_foresight.tasks import Task

SHORT = ("tasks=[{env: search, world: true, options: {max_turns: 2}}, "
         "{env: math, world: true, options: {max_turns: 2}}]")
"""The world's task sets, two turns per episode: the command's cost is the model's prefill of
every context at every turn (about 2,000 tokens/s on 2 cores)."""


class ScriptedPolicy:
    """Stands in for the generator: each row's turn is a calculator step, the right answer or
    a wrong one, drawn from a generator seeded with the call's seed (as the real one is)."""

    TURNS = ("<calc>2 + 3</calc>", "<calc>2 + 3</calc>", "<answer>5</answer>",
             "<answer>4</answer>")

    def __init__(self):
        self.tokenizer = ByteTokenizer()

    def generate(self, prompts, sampling, stop_texts=()):
        rng = random.Random(sampling.seed)
        out = []
        for _ in prompts:
            ids = self.tokenizer.encode(rng.choice(self.TURNS))
            out.append(Completion(ids, [0.0] * len(ids), "stop"))
        return out


TASK = Task("t1", "math", "What is 2 + 3?", ("5",), task_set="sums")


def _play(monkeypatch, samples=3, mc=4, env=lambda task: MathEnv(max_turns=3)):
    """play_tasks by rounds with the scripted policy, one task; also returns the continuations
    it played."""
    batches = []
    real = collect.play_episodes

    def spy(generator, records, envs, *args, **kwargs):
        real(generator, records, envs, *args, **kwargs)
        batches.append(records)

    monkeypatch.setattr(collect, "play_episodes", spy)
    played, = collect.play_tasks(ScriptedPolicy(), [TASK], env, Sampling(temperature=1.0),
                                 samples, mc, batch_size=5, fmt=FORMATS["v1"], seed=7,
                                 rollout="rounds")
    return played, batches[1] if mc else []


def _depth(continuation, record) -> int:
    """How many of `record`'s turns a continuation started from (they are the same objects)."""
    n = 0
    while (n < min(len(continuation.turns), len(record.turns))
           and continuation.turns[n] is record.turns[n]):
        n += 1
    return n


def test_estimates_count_the_continuations_played_from_each_state(monkeypatch):
    played, continuations = _play(monkeypatch)
    records, M, N = played.records, 4, 3
    fresh = [c for c in continuations if all(_depth(c, r) == 0 for r in records)]
    assert len(fresh) == M
    informative = 0
    for i, (record, estimates) in enumerate(zip(records, played.estimates)):
        assert [e.turn for e in estimates] == list(range(len(record.turns)))
        others = sum(r.success for j, r in enumerate(records) if j != i)
        assert (estimates[0].n, estimates[0].successes) == (
            M + N - 1, sum(c.success for c in fresh) + others)  # leave-one-out
        for e in estimates[1:]:
            mine = [c for c in continuations if _depth(c, record) == e.turn]
            assert e.n == len(mine) == M
            assert e.successes == sum(c.success for c in mine)
            for c in mine:  # the context is the record's own token prefix, played on
                start = record.turns[e.turn].start
                assert c.ids[:start] == record.ids[:start] and c.turns[e.turn].start == start
            informative += 0 < e.successes < e.n
    assert informative  # some states were neither sure wins nor sure losses
    assert played.continuations == len(continuations)
    assert played.tokens == (sum(len(t.ids) for r in records for t in r.turns)
                             + sum(len(t.ids) for c in continuations
                                   for t in c.turns[max(_depth(c, r) for r in records):]))


def test_trajectories_validate_and_carry_the_episode_as_played(monkeypatch):
    played, _ = _play(monkeypatch, samples=2, mc=2)
    for sample, (record, estimates) in enumerate(zip(played.records, played.estimates)):
        t = collect.trajectory(record, sample, estimates, {"temperature": 1.0})
        assert t.id == f"sums/t1/s{sample}" and t.prompt == record.prompt
        assert [x.text for x in t.turns if x.role == "agent"] == [x.text for x in record.turns]
        assert t.outcome.success == record.success and len(t.mc) == len(record.turns)
        assert t.meta["ended"] == record.ended and t.meta["sample"] == sample


def test_mc_zero_writes_no_estimates_and_a_nondeterministic_env_is_refused(monkeypatch):
    played, _ = _play(monkeypatch, mc=0)
    assert played.estimates == [[], [], []] and played.continuations == 0

    class Drifting(MathEnv):
        calls = 0

        def tool(self, argument):
            Drifting.calls += 1
            return str(Drifting.calls)

    with pytest.raises(UsageError, match="deterministic environment"):
        _play(monkeypatch, env=lambda task: Drifting(max_turns=3))


def test_a_torn_last_line_is_cut_off_and_its_id_not_counted(tmp_path):
    shard = tmp_path / "collect-00000-of-00001.jsonl"
    shard.write_text('{"id": "a/1/s0"}\n{"id": "a/1/s1"}\n{"id": "a/')
    (tmp_path / "collect-00000-of-00001.dropped.txt").write_text("a/2/s0\na/2/s")
    assert collect.done_ids(tmp_path) == {"a/1/s0", "a/1/s1", "a/2/s0"}
    collect.repair_torn_lines(tmp_path)
    assert shard.read_text() == '{"id": "a/1/s0"}\n{"id": "a/1/s1"}\n'
    shard.write_text('{"id": "a/1/s0"}\nnot json\n')
    with pytest.raises(UsageError, match=":2: not a trajectory record"):
        collect.done_ids(tmp_path)


def test_a_directory_source_is_fingerprinted_by_its_jsonl_parts(tmp_path):
    from megatron_foresight.training.sources import _fingerprint

    (tmp_path / "collect-00000-of-00002.jsonl").write_text("{}\n")
    (tmp_path / "collect.json").write_text("{}\n")
    before = _fingerprint(tmp_path)
    assert [Path(f["path"]).name for f in before] == ["collect-00000-of-00002.jsonl"]
    (tmp_path / "collect-00001-of-00002.jsonl").write_text("{}\n")
    assert _fingerprint(tmp_path) != before  # a new part: the source is tokenized again


def _identity(tmp_path, tokenizer=None, **changes) -> dict:
    """What a command with `changes` to its options records, on a one-off math set."""
    from types import SimpleNamespace

    from megatron_foresight.eval.run import one_off_task_set
    from megatron_foresight.tasksets import TaskSets

    cfg = SimpleNamespace(seed=1, foresight_format="v1",
                          data=SimpleNamespace(seq_length=changes.pop("seq_length", 512)))
    sets = TaskSets([one_off_task_set(str(tmp_path / "sums.jsonl"), "math", "train", None)])
    if "max_turns" in changes:
        sets.sets[0].cfg.env_options.max_turns = changes.pop("max_turns")
    opts = collect.CollectOptions(ckpt=None, out=str(tmp_path / "out"), **changes)
    return opts.identity(cfg, tmp_path, sets, tokenizer)


def test_a_resume_must_keep_every_option_its_records_depend_on(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recorded = _identity(tmp_path, ByteTokenizer())
    collect.write_manifest(out, {"options": recorded})
    assert not (out / "collect.json.tmp").exists()
    collect.check_resumable(out, recorded)
    collect.check_resumable(out, _identity(tmp_path))  # the tokenizer: checked once built
    cases = [({"batch_size": 8}, "--batch-size 16 (this command: --batch-size 8)"),
             ({"seq_length": 1024}, "data.seq_length 512 (this command: data.seq_length 1024)"),
             ({"max_turns": 2}, "the task sets' options {'sums': {"),
             ({"samples": 3, "top_p": 0.9},
              "--samples 4, --top-p 1.0 (this command: --samples 3, --top-p 0.9)")]
    for changes, message in cases:
        with pytest.raises(UsageError) as e:
            collect.check_resumable(out, _identity(tmp_path, **changes))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    other = {**recorded, "tokenizer": {"type": "hf", "path": "/m", "vocab_size": 9}}
    with pytest.raises(UsageError, match="made with data.tokenizer {'type': 'byte'"):
        collect.check_resumable(out, other)
    # a resume may play fewer or other sets: only the sets both play are compared
    collect.check_resumable(out, {**recorded, "env_options": {"other": {"max_turns": 1}}})


def test_a_collection_from_before_the_rollout_flag_resumes_by_rounds_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    older = _identity(tmp_path, ByteTokenizer())
    assert older.pop("rollout") == "continuous"  # the default now
    collect.write_manifest(out, {"options": older})
    collect.check_resumable(out, _identity(tmp_path, ByteTokenizer(), rollout="rounds"))
    with pytest.raises(UsageError) as e:
        collect.check_resumable(out, _identity(tmp_path, ByteTokenizer()))
    assert "made with --rollout rounds (this command: --rollout continuous)" in str(e.value)
    with pytest.raises(UsageError, match="--rollout sideways: one of continuous, rounds"):
        _identity(tmp_path, rollout="sideways")


@pytest.mark.parametrize("text", ["", "{not json", '{"status": "running"}', "[1]"])
def test_a_manifest_that_does_not_read_is_one_line_naming_it(tmp_path, text):
    (tmp_path / "collect.json").write_text(text)
    with pytest.raises(UsageError) as e:
        collect.check_resumable(tmp_path, _identity(tmp_path))
    message = str(e.value)
    assert str(tmp_path / "collect.json") in message and "delete it" in message
    assert "another --out" in message and "\n" not in message


def test_rendered_sources_are_cached_per_render_version(tmp_path, monkeypatch):
    from megatron_foresight.training import sources

    (tmp_path / "t.jsonl").write_text("{}\n")
    monkeypatch.setattr(sources, "preprocess", lambda *args: None)
    sc = sources.SourceContext(seed=1, tokenizer=ByteTokenizer(), tokenizer_cfg=None,
                               cache_dir=tmp_path / "cache", world=None)
    before = sources.cached_trajectories(tmp_path / "t.jsonl", "transcript", sc)
    monkeypatch.setattr(sources, "RENDER_VERSION", sources.RENDER_VERSION + 1)
    assert sources.cached_trajectories(tmp_path / "t.jsonl", "transcript", sc) != before


# --------------------------------------------------------------------------------------------
# the command, on the real model


@pytest.fixture(scope="module")
def policy(small_world, data_cache, tmp_path_factory) -> Path:
    """Two steps of the tiny test recipe with the small world's tokenizer (contexts half as
    long as with bytes)."""
    run_dir = tmp_path_factory.mktemp("collect-policy") / "run"
    train(run_dir, [f"data.world={small_world}", "data.tokenizer.type=sentencepiece",
                    "schedule.train_steps=2"], cache_dir=data_cache)
    return run_dir


def _args(policy, world, cache, out, *extra) -> list[str]:
    return ["data", "collect", str(TEST_RECIPE), f"data.world={world}",
            f"data.cache_dir={cache}", "data.tokenizer.type=sentencepiece",
            "data.seq_length=512", SHORT, "--ckpt", str(policy), "--out", str(out),
            "--samples", "2", "--mc", "2", "--max-new-tokens", "8", *extra]


@pytest.fixture(scope="module")
def collected(policy, small_world, data_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("collected") / "out"
    foresight(_args(policy, small_world, data_cache, out, "--tasks", "3"))
    return out


def _lines(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("collect-*.jsonl"))}


def test_collect_writes_valid_trajectories_with_estimates_of_every_state(collected):
    assert foresight(["data", "validate", *map(str, collected.glob("*.jsonl"))]).returncode == 0
    trajectories = list(read_trajectories(collected))
    assert [t.id.rsplit("/", 1)[1] for t in trajectories] == ["s0", "s1"] * 3
    assert [t.meta["task_set"] for t in trajectories] == ["search"] * 2 + ["math"] * 2 + \
        ["search"] * 2
    for t in trajectories:
        agent_turns = sum(x.role == "agent" for x in t.turns)
        assert [(m.turn, m.n) for m in t.mc] == [(0, 3)] + [(k, 2) for k in
                                                            range(1, agent_turns)]
        assert t.meta["temperature"] == 1.0 and len(t.meta["stops"]) == agent_turns
        # the bare task prompt: FE-SFT's hindsight adds the foresight instruction itself
        assert t.prompt.startswith(("Answer the question", "Solve the problem")), t.prompt
    manifest = json.loads((collected / "collect.json").read_text())
    assert manifest["status"] == "complete" and manifest["trajectories_in_out"] == 6
    assert manifest["counts"]["tasks"] == 3 and manifest["counts"]["written"] == 6
    assert manifest["options"]["samples"] == 2 and manifest["throughput"]["tokens_per_s"] > 0


def test_resume_after_a_torn_line_writes_exactly_what_is_missing(collected, policy,
                                                                small_world, data_cache,
                                                                tmp_path):
    out = tmp_path / "out"
    shutil.copytree(collected, out)
    shard = out / "collect-00000-of-00001.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # killed writing the 6th record
    foresight(_args(policy, small_world, data_cache, out, "--tasks", "3"))
    assert _lines(out) == _lines(collected)  # the task played again gives the same records
    counts = json.loads((out / "collect.json").read_text())["counts"]
    # continuously, the three tasks shared the slots: all three are played again (so the
    # batch is the one they first shared) and only the missing record is written
    assert (counts["tasks"], counts["written"]) == (3, 1)


def test_other_options_or_bad_flags_are_refused_in_one_line(collected, policy, small_world,
                                                             data_cache, capsys):
    cases = [(["--tasks", "3", "--samples", "3"], "made with --samples 2 (this command: "
                                                 "--samples 3); use another --out"),
             (["--temperature", "0.5"], "made with --temperature 1.0"),
             (["--mc", "-1"], "--mc -1"),
             (["--samples", "0"], "--samples 0"),
             (["--temperature", "0"], "--temperature 0 is greedy")]
    for extra, message in cases:
        assert main(_args(policy, small_world, data_cache, collected, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    args = _args(small_world, small_world, data_cache, collected)
    assert main(args) == 2
    assert "no complete checkpoint there" in capsys.readouterr().err


def test_drop_failed_leaves_unsuccessful_episodes_out_and_remembers_them(policy, small_world,
                                                                        data_cache, tmp_path):
    out = tmp_path / "out"
    foresight(_args(policy, small_world, data_cache, out, "--tasks", "1", "--mc", "0",
                    "--drop-failed", "--rollout", "rounds"))
    counts = json.loads((out / "collect.json").read_text())["counts"]
    assert counts["written"] == counts["successes"] and counts["dropped"] == 2 - counts[
        "successes"]
    written = {t.id for t in read_trajectories(out)} if counts["written"] else set()
    done = collect.done_ids(out)  # what a resume skips: the dropped ids count as done
    assert len(done) == 2 and {i.rsplit("/", 1)[1] for i in done} == {"s0", "s1"}
    assert len(done - written) == counts["dropped"]


def test_wm_amt_trains_on_the_collection_directory(collected, small_world, data_cache,
                                                   tmp_path):
    run = tmp_path / "wm"
    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "wm_amt.yaml"),
               f"data.world={small_world}", f"data.cache_dir={data_cache}",
               f"wm_amt.sources=[{collected}]", "wm_amt.weights=[1.0]",
               f"wm_amt.valid_sources=[{collected}]", "data.seq_length=512",
               "schedule.train_steps=2", "schedule.warmup_steps=1", "schedule.eval_interval=0",
               "schedule.eval_steps=0", "checkpoint.save_interval=0",
               "logging.tensorboard=false", "--run-dir", str(run)])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 2 and "lm_loss" in steps[-1]
    # the directory's parts were rendered and tokenized as one source
    assert any(p.name.startswith(f"{collected.name}-wm_amt-") for p in data_cache.iterdir())


@pytest.mark.slow
def test_two_data_parallel_ranks_write_the_one_process_records(collected, policy, small_world,
                                                               data_cache, tmp_path):
    out = tmp_path / "out"
    foresight(_args(policy, small_world, data_cache, out, "--tasks", "3"), nproc=2)
    shards = _lines(out)
    assert sorted(shards) == ["collect-00000-of-00002.jsonl", "collect-00001-of-00002.jsonl"]
    union = sorted(line for data in shards.values() for line in data.splitlines())
    assert union == sorted(_lines(collected)["collect-00000-of-00001.jsonl"].splitlines())
    assert json.loads((out / "collect.json").read_text())["counts"]["written"] == 6


@pytest.mark.slow
def test_tensor_parallel_ranks_write_one_shard(policy, small_world, data_cache, tmp_path):
    """Both ranks of a TP=2 group play the same episodes; only the first writes them."""
    out = tmp_path / "out"
    foresight(_args(policy, small_world, data_cache, out, "--tasks", "2",
                    "parallel.tensor_model_parallel_size=2"), nproc=2)
    assert sorted(_lines(out)) == ["collect-00000-of-00001.jsonl"]
    assert len(list(read_trajectories(out))) == 4
