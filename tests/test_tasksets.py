"""Task sets in recipes, the environment registry, and retrieval over a user's corpus: the
index is built once and reused, equals bm25s's results, and bad files say where and what."""

import gzip
import json
import random
import textwrap

import pytest

from megatron_foresight.cli import main
from megatron_foresight.config import ConfigError, load_recipe
from megatron_foresight.data.records import DataFileError
from megatron_foresight.tasks import Document
from megatron_foresight.envs import bm25_index, registry
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.tasksets import TaskSets
from megatron_foresight.errors import UsageError
from helpers.run import REPO

FC_RL = REPO / "recipes" / "tiny-cpu" / "fc_rl.yaml"


def _jsonl(path, records, compress=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


def _corpus(n, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)] + ["river", "rivers", "the", "of", "town", "towns"]
    return [Document(f"d{i}", f"Title {rng.choice(words)}",
                     " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
            for i in range(n)]


def _recipe(tmp_path, tasks: str, *extra):
    path = tmp_path / "rl.yaml"
    path.write_text(f"base: {FC_RL}\ntasks:\n{textwrap.indent(textwrap.dedent(tasks), '  ')}\n")
    return load_recipe(path, list(extra))


# ---------------------------------------------------------------------------------------------
# retrieval


def test_index_equals_bm25s_on_the_same_corpus_and_queries(tmp_path):
    import bm25s
    import Stemmer

    docs = _corpus(600) + [Document("empty", "", "the of")]
    ours = BM25Retriever.from_documents(docs)
    stemmer = Stemmer.Stemmer("english")
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize([f"{d.title}\n{d.text}" for d in docs], stopwords="en",
                             stemmer=stemmer, show_progress=False), show_progress=False)
    rng = random.Random(1)
    for _ in range(100):
        query = " ".join(f"w{rng.randrange(420)}" for _ in range(rng.randint(1, 4)))
        ids, scores = ref.retrieve(bm25s.tokenize([query], stopwords="en", stemmer=stemmer,
                                                  show_progress=False),
                                   k=5, show_progress=False, n_threads=1)
        expected = [(docs[i].id, float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        assert [(d.id, s) for d, s in ours.search(query, 5)] == expected, query
    assert ours.search("rivers of towns", 3)[0][1] == pytest.approx(
        ours.search("river town", 3)[0][1])  # stems: rivers -> river


def test_index_is_built_once_reused_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    shards = tmp_path / "corpus"
    docs = _corpus(50)
    _jsonl(shards / "part-0.jsonl.gz", [d.to_dict() for d in docs[:30]], compress=True)
    _jsonl(shards / "part-1.jsonl", [{"id": d.id, "contents": f'"{d.title}"\n{d.text}'}
                                     for d in docs[30:]])  # Search-R1's layout
    built = []
    real_build = bm25_index.build_index
    monkeypatch.setattr(bm25_index, "build_index",
                        lambda *a, **k: built.append(1) or real_build(*a, **k))
    cache = tmp_path / "cache"
    first = bm25_index.ensure_index(str(shards), cache, progress=False)
    assert bm25_index.ensure_index(str(shards), cache, progress=False) == first
    assert len(built) == 1
    retriever = BM25Retriever.open(first)
    assert len(retriever) == 50 and retriever.passages[49] == docs[49]
    assert retriever.search(docs[40].text, 1)[0][0] == docs[40]
    # touched but the same records: recognized by the content hash, not rebuilt
    (shards / "part-1.jsonl").write_bytes((shards / "part-1.jsonl").read_bytes())
    assert bm25_index.ensure_index(str(shards), cache, progress=False) == first
    assert len(built) == 1
    _jsonl(shards / "part-1.jsonl", [{"id": "new", "title": "Zed", "text": "zebra quagga"}])
    assert bm25_index.ensure_index(str(shards), cache, progress=False) == first
    assert len(built) == 2
    again = BM25Retriever.open(first)
    assert len(again) == 31 and again.search("zebra", 1)[0][0].id == "new"
    assert not list(cache.rglob(".*building*"))  # the temporary build directory is gone


def test_ranks_waiting_for_the_index_hear_when_rank_0_failed(tmp_path, monkeypatch):
    """Rank 0 builds the index; the others used to poll forever when its build failed."""
    corpus = tmp_path / "corpus.jsonl"
    _jsonl(corpus, [d.to_dict() for d in _corpus(5)])
    monkeypatch.setattr(bm25_index, "build_index",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk on fire")))
    with pytest.raises(OSError, match="disk on fire"):
        bm25_index.ensure_index(str(corpus), tmp_path / "cache", progress=False)
    import megatron_foresight.runtime.dist as dist_mod

    monkeypatch.setattr(dist_mod, "is_rank0", lambda: False)  # now as rank 1
    with pytest.raises(UsageError, match="rank 0 could not index the corpus.*disk on fire"):
        bm25_index.ensure_index(str(corpus), tmp_path / "cache", progress=False,
                                poll_seconds=0.2)


def test_index_command_bad_passages_and_skip_bad(tmp_path, capsys):
    bad = _jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "A", "text": "alpha"},
                                        {"id": "2", "title": "B"},
                                        {"id": "3", "title": "C", "text": "  "},
                                        "{torn", {"id": "5", "text": "epsilon"}])
    out = tmp_path / "idx"
    assert main(["data", "index", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2: field 'text': missing or not a string" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "index", str(bad), "--out", str(out), "--skip-bad"]) == 0
    assert "2 passages, 3 skipped" in capsys.readouterr().out
    assert json.loads((out / bm25_index.MANIFEST).read_text())["skipped"] == 3
    assert main(["data", "index", str(bad), "--out", str(out), "--skip-bad"]) == 0
    assert "already indexes this corpus" in capsys.readouterr().out
    torn = tmp_path / "t.jsonl.gz"
    torn.write_bytes(gzip.compress(b'{"id": "1", "text": "a"}\n' * 50)[:40])
    assert main(["data", "index", str(torn), "--out", str(tmp_path / "i2")]) == 2
    assert "not a readable gzip file" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["data", "index", str(bad), "--out", str(tmp_path / "other"), "--skip-bad"]) == 2
    assert "is not a corpus index" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# task sets in the recipe


def test_task_sets_play_every_set_in_turn_and_draw_by_weight(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"question": f"a{i}", "answer": "1"} for i in range(5)])
    _jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}", "answer": "1"} for i in range(2)])
    cfg = _recipe(tmp_path, f"""\
        - {{name: a, env: math, splits: {{train: {tmp_path}/a.jsonl, validation: {tmp_path}/a.jsonl}}}}
        - {{name: b, env: math, weight: 3, splits: {{train: {tmp_path}/b.jsonl}}}}
        """, "fc_rl.validation_tasks=0")
    sets = TaskSets.of(cfg)
    # no set is cut short by another: all 7 tasks, alternating while both last
    assert [t.question for t in sets.tasks("train")] == ["a0", "b0", "a1", "b1", "a2", "a3",
                                                         "a4"]
    assert [t.question for t in sets.tasks("train", 3)] == ["a0", "b0", "a1"]
    assert {t.task_set for t in sets.tasks("validation")} == {"a"}
    assert all(t.type == "math" for t in sets.tasks("train"))
    drawn = sets.draw("train", 4000, random.Random(0))
    share_b = sum(t.task_set == "b" for t in drawn) / len(drawn)
    assert 0.72 < share_b < 0.78  # weight 3 of 4
    assert [t.id for t in sets.draw("train", 6, random.Random(5))] == \
        [t.id for t in sets.draw("train", 6, random.Random(5))]
    with pytest.raises(UsageError, match="no task set has a 'test' split"):
        sets.tasks("test")


@pytest.mark.parametrize("tasks, extra, words", [
    ("- {env: serch, splits: {train: x.jsonl}}", [],
     "tasks[0].env: environment 'serch' is not registered (did you mean 'search'?); "
     "registered: math, search"),
    ("- {env: search, splits: {train: x.jsonl}}", [],
     "tasks[0].options.corpus: a search task set needs a corpus"),
    ("- {env: search, world: true}", ["data.world=null", "data.tokenizer.type=byte"],
     "tasks[0].world: a world set needs data.world"),
    ("- {env: math, splits: {train: x.jsonl}}\n- {env: math, splits: {train: y.jsonl}}", [],
     "tasks[1].name: two task sets are named 'math'"),
    ("- {env: math, splits: {train: x.jsonl}, options: {top_k: 3}}", [],
     "tasks[0].options.top_k: unknown key in section 'options'; valid keys: max_turns, "
     "prompt_template, symbolic"),
    ("- {env: math}", [], "tasks[0].splits: give the task file of each split"),
    ("- {env: math, splits: {validation: x.jsonl}}", [],
     "tasks: FC-RL trains on the 'train' split of every task set; math has none"),
])
def test_bad_task_sets_are_refused_when_the_recipe_loads(tmp_path, tasks, extra, words):
    with pytest.raises(ConfigError) as error:  # FC-RL's own checks run when the recipe loads
        _recipe(tmp_path, tasks, *extra)
    assert words in str(error.value)
    if "options" in words or "env:" in words:
        assert str(error.value).startswith(f"{tmp_path / 'rl.yaml'}:")  # the file and line


def test_config_checks_task_files_and_corpora_before_anything_runs(tmp_path, capsys):
    _jsonl(tmp_path / "squad.jsonl", [{"title": "T", "context": "c", "qas": []}])
    _jsonl(tmp_path / "corpus.jsonl", [{"id": "1", "title": "A", "text": "alpha"}])
    recipe = tmp_path / "rl.yaml"

    def config(tasks):
        recipe.write_text(f"base: {FC_RL}\ntasks:\n  {tasks}\n")
        code = main(["config", str(recipe), "fc_rl.validation_tasks=0"])
        return code, capsys.readouterr().err

    code, err = config(f"- {{env: math, splits: {{train: {tmp_path}/nope.jsonl}}}}")
    assert code == 2 and f"split 'train': {tmp_path}/nope.jsonl not found" in err
    code, err = config(f"- {{env: search, splits: {{train: {tmp_path}/squad.jsonl}}, "
                       f"options: {{corpus: {tmp_path}/corpus.jsonl}}}}")
    assert code == 2 and f"{tmp_path}/squad.jsonl:1: not a task layout this reads (keys: " \
                         "title, context, qas)" in err
    _jsonl(tmp_path / "nq.jsonl", [{"question": "q?", "answer": ["a"]}])
    code, err = config(f"- {{env: search, splits: {{train: {tmp_path}/nq.jsonl}}, "
                       f"options: {{corpus: {tmp_path}/missing.jsonl}}}}")
    assert code == 2 and f"file not found: {tmp_path}/missing.jsonl" in err
    code, err = config(f"- {{env: search, splits: {{train: {tmp_path}/nq.jsonl, validation: "
                       f"{tmp_path}/nq.jsonl}}, options: {{corpus: {tmp_path}/corpus.jsonl}}}}")
    assert code == 0, err


def test_a_search_set_answers_from_its_own_corpus(tmp_path):
    _jsonl(tmp_path / "nq.jsonl", [{"question": "Which river is Kalo on?", "answer": ["Amber"]}])
    _jsonl(tmp_path / "c.jsonl.gz", [
        {"id": "1", "title": "Kalo", "text": "Kalo lies on the Amber river. " * 40},
        {"id": "2", "title": "Vasru", "text": "Vasru trades salt."}], compress=True)
    cfg = _recipe(tmp_path, f"""\
        - {{name: nq, env: search, splits: {{train: {tmp_path}/nq.jsonl}},
           options: {{corpus: {tmp_path}/c.jsonl.gz, top_k: 1, max_passage_chars: 60}}}}
        """, "fc_rl.validation_tasks=0")
    sets = TaskSets.of(cfg)
    sets.prepare(tmp_path / "cache", progress=False)
    (task,) = sets.tasks("train")
    env = sets.make_env(task)
    assert env.reset(task).endswith("Question: Which river is Kalo on?")
    step = env.step("<search>Kalo river</search>")
    assert step.observation == ("<information>Doc 1 (Title: Kalo) Kalo lies on the Amber river. "
                                "Kalo lies on the Amber river. ...</information>")
    done = env.step("<answer>the Amber</answer>")
    assert done.done and done.info["success"] and done.info["f1"] == 1.0


def test_a_world_manifest_without_sizes_is_named(tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    (world / "manifest.json").write_text('{"seed": 1}')
    with pytest.raises(ConfigError, match=f"{world}/manifest.json: no 'sizes'"):
        load_recipe(FC_RL, [f"data.world={world}"])


def test_variables_in_recipes_come_from_the_environment(tmp_path, monkeypatch):
    _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    tasks = "- {env: math, splits: {train: '${MY_DATA}/gsm8k.jsonl', test: '${NOPE:-x}/t.jsonl'}}"
    with pytest.raises(ConfigError, match=r"rl.yaml:3: tasks\[0\].splits.train: environment "
                                          r"variable MY_DATA is not set"):
        _recipe(tmp_path, tasks, "fc_rl.validation_tasks=0")
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    cfg = _recipe(tmp_path, tasks, "fc_rl.validation_tasks=0")
    assert cfg.tasks[0].files == {"train": f"{tmp_path}/gsm8k.jsonl", "test": "x/t.jsonl"}


# ---------------------------------------------------------------------------------------------
# a toy environment, registered from outside the package


def test_a_registered_environment_joins_the_format_and_plays():
    from megatron_foresight.foresight.format import (
        AgentTurn, observation_content, parse_turn,
    )
    from megatron_foresight.foresight.formats import FORMATS
    from helpers import toy_env

    assert registry.get("convert") is toy_env.SPEC and "convert" in registry.names()
    assert "</convert>" in FORMATS["v1"].stop_texts()
    turn = parse_turn("<foresight>\n<plan>convert</plan>\n<rollout>3000 m</rollout>\n"
                      "<value>0.9</value>\n</foresight>\n<convert>3 km to m</convert>")
    assert isinstance(turn, AgentTurn) and turn.action.kind == "convert"
    env = toy_env.ConvertEnv()
    from megatron_foresight.tasks import Task

    env.reset(Task("t", "convert", "3 km in m?", ("3000",)))
    step = env.step("<convert>3 km to m</convert>")
    assert step.observation == "<conversion>3000 m</conversion>"
    assert observation_content(step.observation) == "3000 m"
    assert env.step("<answer>3000 metres</answer>").info["success"]


def test_registering_an_environment_checks_what_it_declares():
    from dataclasses import dataclass

    from megatron_foresight.envs.registry import EnvSpec, register
    from helpers import toy_env

    @dataclass
    class Options:
        """An environment without options."""

    with pytest.raises(ValueError, match="plays tasks of type 'convert'; register it under that"):
        register(EnvSpec("units", toy_env.ConvertEnv, Options, lambda o, c: toy_env.ConvertEnv))
    with pytest.raises(ValueError, match="'convert' is already registered"):
        register(EnvSpec("convert", toy_env.ConvertEnv, Options, lambda o, c: toy_env.ConvertEnv))
    with pytest.raises(TypeError, match="options must be a dataclass"):
        register(EnvSpec("convert", toy_env.ConvertEnv, dict, lambda o, c: toy_env.ConvertEnv))
