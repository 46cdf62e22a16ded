"""The built-in world: same seed, same bytes; disjoint splits; trajectories that pass the
validator, with successes, failures and Monte-Carlo estimates; its tokenizer."""

import json

import pytest

from megatron_foresight.data.task_files import read_tasks
from megatron_foresight.data.tokenizer import SentencePieceTokenizer
from megatron_foresight.data.trajectory import read_trajectories
from megatron_foresight.data.validate import validate_file
from megatron_foresight.foresight.tags import symbols
from megatron_foresight.world.build import build_world
from megatron_foresight.world.sizes import WorldSizes

SIZES = WorldSizes(cities=30, people=80, guilds=12, search_tasks=300, math_tasks=300,
                   trajectories=60, validation_trajectories=10, mc_samples=3, vocab_size=1024)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "a"
    build_world(out, seed=5, sizes=SIZES, progress=False)
    return out


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_byte_identical_files_also_with_two_workers(world_dir, tmp_path):
    build_world(tmp_path / "b", seed=5, sizes=SIZES, workers=2, progress=False)
    assert _files(world_dir) == _files(tmp_path / "b")
    build_world(tmp_path / "c", seed=6, sizes=SIZES, progress=False)
    assert _files(world_dir)["corpus.jsonl"] != _files(tmp_path / "c")["corpus.jsonl"]


def test_splits_are_disjoint_and_sized(world_dir):
    manifest = json.loads((world_dir / "manifest.json").read_text())
    for task_type in ("search", "math"):
        questions = {}
        for split in ("train", "validation", "test"):
            tasks = list(read_tasks(world_dir / "tasks" / f"{task_type}-{split}.jsonl"))
            assert len(tasks) == manifest["tasks"][task_type][split] > 0
            questions[split] = {t.question for t in tasks}
        assert sum(map(len, questions.values())) == 300
        assert not questions["train"] & questions["validation"]
        assert not questions["train"] & questions["test"]
        assert not questions["validation"] & questions["test"]


def test_trajectories_are_valid_with_successes_failures_and_mc(world_dir):
    path = world_dir / "trajectories" / "train.jsonl"
    report = validate_file(path)
    assert report.records == 60 and not report.problems
    trajectories = list(read_trajectories(path))
    outcomes = [t.outcome.success for t in trajectories]
    assert 0 < sum(outcomes) < len(outcomes)
    train_ids = {t.id for t in read_tasks(world_dir / "tasks" / "search-train.jsonl")} | \
        {t.id for t in read_tasks(world_dir / "tasks" / "math-train.jsonl")}
    for t in trajectories:
        assert t.task_id in train_ids
        agent_turns = sum(turn.role == "agent" for turn in t.turns)
        assert [m.turn for m in t.mc] == list(range(agent_turns))
        assert all(m.n == 3 for m in t.mc)
    # Successful episodes come mostly from less noisy experts, whose start states the
    # Monte-Carlo estimate rates higher.
    def mean_start_value(success):
        values = [t.mc[0].value for t in trajectories if t.outcome.success == success]
        return sum(values) / len(values)
    assert mean_start_value(True) > mean_start_value(False)


def test_world_tokenizer_makes_every_tag_one_token(world_dir):
    tok = SentencePieceTokenizer(str(world_dir / "tokenizer" / "spm.model"))
    for symbol in symbols():
        assert len(tok.encode(symbol)) == 1, symbol
    text = next(iter(read_trajectories(world_dir / "trajectories" / "train.jsonl"))).turns[0].text
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= 1024 and tok.eod == 2


def test_world_tokenizer_keeps_names_and_common_words_whole(tmp_path):
    """In a world of the default sizes and vocabulary (few trajectories: they do not matter
    here), every word of every entity's name and the questions' common words are one token
    after a space: copying a name is copying one token. (The unigram model this tokenizer was
    before split "people" in four pieces and "Brilo" in two.)"""
    build_world(tmp_path, seed=5, progress=False, sizes=WorldSizes(
        search_tasks=300, math_tasks=300, trajectories=60, validation_trajectories=10,
        mc_samples=0))
    tok = SentencePieceTokenizer(str(tmp_path / "tokenizer" / "spm.model"))
    entities = json.loads((tmp_path / "world.json").read_text())["entities"]
    words = {w for e in entities for w in e["name"].split()}
    split = sorted(w for w in words if len(tok.encode(" " + w)) != 1)
    assert len(words) > 400 and not split, split
    for word in ("people", "live", "profession", "founded", "many", "days"):
        assert len(tok.encode(" " + word)) == 1, word


def test_a_vocabulary_too_small_for_the_worlds_characters_says_how_large(tmp_path):
    from megatron_foresight.errors import UsageError

    with pytest.raises(UsageError, match=r"vocabulary of 100 pieces is too small .* need \d+; "
                                         r"ask for at least that many \(build-world: --vocab"):
        build_world(tmp_path, seed=5, progress=False, sizes=WorldSizes(
            search_tasks=200, math_tasks=200, trajectories=10, validation_trajectories=2,
            mc_samples=0, vocab_size=100))


def test_world_tokenizer_exports_to_hugging_face_with_the_same_ids(world_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = SentencePieceTokenizer(str(world_dir / "tokenizer" / "spm.model"))
    tok.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["\n".join([t.prompt, *(turn.text for turn in t.turns)])
             for t in read_trajectories(world_dir / "trajectories" / "train.jsonl")]
    texts += [(world_dir / "corpus.jsonl").read_text()[:3000], "ünïcode  spaces\n\n<answer>7"]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    assert hf.eos_token_id == tok.eod and hf.pad_token_id == tok.pad and len(hf) == tok.vocab_size


def test_a_retrained_tokenizer_of_the_same_size_is_another_tokenizer(world_dir, tmp_path):
    """Cached token streams are keyed by the tokenizer's `describe()`: a model rewritten in
    the same place with the same number of bytes (here one piece's score changed) must not
    reuse them. (It was keyed by the file's size.)"""
    from sentencepiece import sentencepiece_model_pb2

    path = tmp_path / "spm.model"
    path.write_bytes((world_dir / "tokenizer" / "spm.model").read_bytes())
    before = SentencePieceTokenizer(str(path)).describe()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.pieces[-1].score -= 1.0
    path.write_bytes(proto.SerializeToString())
    assert path.stat().st_size == len((world_dir / "tokenizer" / "spm.model").read_bytes())
    after = SentencePieceTokenizer(str(path)).describe()
    assert after != before and after["path"] == before["path"]


def test_asking_for_more_tasks_than_the_world_has_says_what_to_change():
    from megatron_foresight.errors import UsageError
    from megatron_foresight.world.build import World

    with pytest.raises(UsageError, match="only .* distinct questions; ask for fewer "
                                         "--search-tasks or a larger world"):
        World(1, WorldSizes(cities=5, people=5, guilds=2, search_tasks=5000, vocab_size=0))


def test_difficulty_mix_one_hop_questions_and_two_step_problems():
    """`multi_hop_fraction` and `math_max_steps` set the task mix; the defaults keep both
    kinds of each."""
    from megatron_foresight.world.build import World

    def mix(world):
        search = [len(t.meta["hops"]) for t in world.splits["search"]["train"]]
        math = [len(t.meta["steps"]) for t in world.splits["math"]["train"]]
        return set(search), set(math)

    small = dict(cities=30, people=80, guilds=12, search_tasks=300, math_tasks=300,
                 vocab_size=0)
    assert mix(World(5, WorldSizes(**small))) == ({1, 2}, {2, 3})
    assert mix(World(5, WorldSizes(**small, multi_hop_fraction=0.0, math_max_steps=2))) == \
        ({1}, {2})
    with pytest.raises(ValueError, match="math_max_steps must be 2 or 3"):
        WorldSizes(math_max_steps=1).check()


def _contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i:i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_first_search_spells_the_entity_with_the_questions_tokens(world_dir):
    """A name is copyable only if the search, the plan and the question write it with the same
    tokens: glued to a tag or a quote (`<search>Olgar`) sentencepiece reads another token than
    the question's `▁Olgar`, and the tiny agent learnt to write some fixed name instead."""
    from plugins.fe_sft.hindsight import foresight_trace
    from megatron_foresight.foresight.format import parse_turn

    tok = SentencePieceTokenizer(str(world_dir / "tokenizer" / "spm.model"))
    searched = 0
    for t in read_trajectories(world_dir / "trajectories" / "train.jsonl"):
        if t.task_type != "search":
            continue
        question = tok.encode(t.prompt.split("Question:")[-1])
        agent = foresight_trace(t).turns[0].text
        turn = parse_turn(agent)
        query = turn.action.argument
        if query.split()[0] not in t.prompt:
            continue  # a noisy expert searched for another entity
        searched += 1
        name = tok.encode(" " + " ".join(w for w in query.split() if w[0].isupper()))
        for where in (agent[agent.index("<search>"):], turn.foresight.plan):
            assert _contains(tok.encode(where), name), (where, t.prompt)
        assert _contains(question, name), t.prompt
    assert searched >= 10


def test_experts_quote_the_words_they_copy_from(world_dir):
    """What an expert copies it first quotes: a search expert's think repeats, word for word,
    the sentence of a passage it read that states the value it uses next (the answer, or the
    next hop's entity); a math expert's step names each of the problem's numbers with the
    problem's own words around it. A model imitating them copies along text it has just
    matched, not straight from a passage or problem to the value."""
    from megatron_foresight.foresight.action import parse_action

    quotes = steps = 0
    for t in read_trajectories(world_dir / "trajectories" / "train.jsonl"):
        question = t.prompt.split("Problem:")[-1]
        for k in range(2, len(t.turns), 2):
            agent = t.turns[k].text
            read = "\n".join(turn.text for turn in t.turns[1:k:2])  # the observations so far
            think = agent[agent.index("<think>") + 7:agent.index("</think>")]
            action = parse_action(agent)
            if " says: " in think:
                quotes += 1
                sentence = think.split(" says: ", 1)[1].split(". ")[0] + "."
                assert sentence in read, (think, read)
                if action.kind == "answer" and t.outcome.success:
                    assert action.argument.strip() in sentence, (think, agent)
        for turn in t.turns[::2]:
            action = parse_action(turn.text)
            if t.task_type == "math" and action.kind == "calc":
                steps += 1
                think = turn.text.split("<think>")[1].split("</think>")[0]
                where = think.split(": ", 1)[1].rsplit(", so ", 1)[0]
                for part in where.split(", "):
                    assert part in question, (part, question)
    assert quotes >= 10 and steps >= 20
