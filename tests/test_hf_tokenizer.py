"""Hugging Face tokenizers through every stage, with SmolLM2-135M-Instruct's BPE tokenizer, in
which a tag is several tokens ("</search>" is "</", "search", ">") and a tag's last token may
merge with what follows ("></", ">."): loss masks decode to the segments they train, generation
stops on a closing tag, rewards find their blocks, the chat template opens episodes the same way
in training and in play, and the ids trained on are the ids sampled. Last, the prompt templates
(the instruction inside that opening).

Generation here runs on a scripted model (`ScriptedModel`, a stand-in for the GPTModel that
emits chosen ids through the real `Generator` and agent loop): these tests are about tokens,
not weights, and the real model's path is tested in test_generate.py and test_convert.py."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_foresight.data.preprocess import SEGMENTS_SUFFIX, preprocess
from megatron_foresight.data.render import Seg, get_renderer
from megatron_foresight.data.segmented import segment_weight_table
from megatron_foresight.data.tokenizer import (
    HFTokenizer, TokenizerConfig, build_tokenizer, episode_prompt,
)
from megatron_foresight.data.trajectory import MCEstimate, Outcome, Trajectory, Turn
from megatron_foresight.envs.math import MathEnv
from megatron_foresight.envs.search import PROMPT as SEARCH_PROMPT
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.formats import FORMATS
from megatron_foresight.inference.agent import run_episodes
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.rl.rewards import char_spans, credit_spans
from megatron_foresight.rl.rollout import ScoredEpisode, agent_tokens, to_sample
from megatron_foresight.tasks import Task
from megatron_foresight.training.plugin import load_plugin
from helpers.smollm2 import build_tokenizer_dir

V1 = FORMATS["v1"]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return build_tokenizer_dir(tmp_path_factory.mktemp("smollm2") / "tokenizer")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return HFTokenizer(str(smollm2_dir))


def _trajectory() -> Trajectory:
    turns = (
        Turn("agent", "<think>Which city?</think>\n<search> capital of Freedonia </search>"),
        Turn("env", "<information>Doc 1 (Title: Freedonia) Its capital is Fredville."
                    "</information>"),
        Turn("agent", "<answer> Fredville </answer>"),
    )
    return Trajectory("t0", "q0", "search",
                      SEARCH_PROMPT.format(question="What is the capital of Freedonia?"), turns,
                      Outcome(True, 1.0, "Fredville"), (MCEstimate(0, 4, 3), MCEstimate(1, 4, 4)))


def _runs(ids, types) -> list[tuple[int, list[int]]]:
    """Maximal runs of one segment type: (type, ids)."""
    runs = []
    for i, t in zip(ids, types):
        if runs and runs[-1][0] == t:
            runs[-1][1].append(i)
        else:
            runs.append((t, [i]))
    return runs


def _text_runs(segments) -> list[tuple[int, str]]:
    runs = []
    for text, seg in segments:
        if runs and runs[-1][0] == int(seg):
            runs[-1] = (int(seg), runs[-1][1] + text)
        else:
            runs.append((int(seg), text))
    return runs


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("stage", ["wm_amt", "fe_sft"])
def test_masked_tokens_decode_to_the_segments_they_train(smollm2_dir, tmp_path, stage, chat):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from plugins.fe_sft.hindsight import foresight_trace

    config = TokenizerConfig("hf", str(smollm2_dir), chat_template=chat)
    tok = build_tokenizer(config)
    trajectory = _trajectory() if stage == "wm_amt" else foresight_trace(_trajectory())
    renderer = load_plugin(stage).Config().renderer
    (tmp_path / "t.jsonl").write_text(json.dumps(trajectory.to_dict()) + "\n")
    preprocess([tmp_path / "t.jsonl"], tmp_path / "t", renderer, config, progress=False)
    tokens, kinds = IndexedDataset(str(tmp_path / "t")), IndexedDataset(f"{tmp_path / 't'}"
                                                                          f"{SEGMENTS_SUFFIX}")
    ids, types = tokens[0].tolist(), kinds[0].tolist()  # views of the mapped files: keep both

    segments = get_renderer(renderer)(trajectory)
    opening = episode_prompt(tok, trajectory.prompt)
    assert segments[0] == (trajectory.prompt + "\n", Seg.PROMPT)
    segments[0] = (opening, Seg.PROMPT)
    assert ids[-1] == tok.eod
    got = [(t, tok.decode(run)) for t, run in _runs(ids[:-1], types[:-1])]
    assert got == _text_runs(segments)
    # what the loss falls on: exactly the stage's weighted segments, decoded
    table = segment_weight_table(load_plugin(stage).Config().segment_weights)
    trained = [(t, tok.decode(run)) for t, run in _runs(ids[:-1], types[:-1]) if table[t] > 0]
    assert trained == [(t, text) for t, text in _text_runs(segments) if table[t] > 0]
    assert ids[:len(tok.encode(opening))] == tok.encode(opening)
    if chat:
        assert opening.startswith("<|im_start|>") and opening.endswith("<|im_start|>assistant\n")
        assert f"<|im_start|>user\n{trajectory.prompt}<|im_end|>" in opening


def test_the_chat_template_needs_an_hf_tokenizer_that_has_one(smollm2_dir, tmp_path):
    with pytest.raises(Exception, match="chat_template: needs type hf"):
        TokenizerConfig("byte", chat_template=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((smollm2_dir / name).read_bytes())
    with pytest.raises(UsageError, match="has no chat template"):
        HFTokenizer(str(bare), chat_template=True)
    assert HFTokenizer(str(bare)).describe() == {**HFTokenizer(str(smollm2_dir)).describe(),
                                                 "path": str(bare.resolve())}


def test_an_edited_chat_template_is_another_tokenizer(smollm2_dir, tmp_path):
    """Caches and PREFIX.json key on describe(): editing the template must tokenize again."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(smollm2_dir, edited)
    jinja, config = edited / "chat_template.jinja", edited / "tokenizer_config.json"
    if jinja.is_file():
        jinja.write_text(jinja.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        data = json.loads(config.read_text())
        data["chat_template"] = data["chat_template"].replace("<|im_start|>", "<|im_start|> ")
        config.write_text(json.dumps(data))
    chat, other = (HFTokenizer(str(d), chat_template=True).describe()
                   for d in (smollm2_dir, edited))
    assert chat["chat_template"] is True and len(chat["chat_template_sha256"]) == 16
    assert chat["chat_template_sha256"] != other["chat_template_sha256"]
    assert chat == HFTokenizer(str(smollm2_dir), chat_template=True).describe()
    assert "chat_template_sha256" not in HFTokenizer(str(edited)).describe()
    from megatron_foresight.data.commands import tokenizer_config

    assert tokenizer_config(str(smollm2_dir), chat_template=True).chat_template  # --chat-template


def test_an_edited_tokenizer_json_of_the_same_size_is_another_tokenizer(smollm2_dir, tmp_path):
    """Caches and PREFIX.json key on describe(): a tokenizer.json edited in place, same
    vocabulary size, must tokenize again; a dataset preprocessed with it says why it is
    refused."""
    import shutil

    from megatron_foresight.training.sources import check_tokenizer

    edited = tmp_path / "edited"
    shutil.copytree(smollm2_dir, edited)
    before = HFTokenizer(str(edited)).describe()
    data = json.loads((edited / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]  # two merges' ranks swapped
    (edited / "tokenizer.json").write_text(json.dumps(data))
    after = HFTokenizer(str(edited)).describe()
    assert after["vocab_size"] == before["vocab_size"] and after["path"] == before["path"]
    assert after != before and len(after["sha256"]) == 16
    assert HFTokenizer(str(edited)).describe() == after  # the same files, the same key
    meta = tmp_path / "d.json"
    meta.write_text(json.dumps({"tokenizer": before}))
    with pytest.raises(UsageError, match="set data.tokenizer to match"):
        check_tokenizer(str(tmp_path / "d"), HFTokenizer(str(edited)))
    meta.write_text(json.dumps({"tokenizer": {k: v for k, v in after.items() if k != "sha256"}}))
    with pytest.raises(UsageError, match="before tokenizers were identified by their content"):
        check_tokenizer(str(tmp_path / "d"), HFTokenizer(str(edited)))


def test_the_vocabulary_is_the_models_and_tags_stay_text(tok):
    """No token is added: the tags are several tokens, and the vocabulary is the 49152 rows
    of SmolLM2's embedding, which Megatron pads no further (a multiple of 128)."""
    from megatron_foresight.config import RecipeConfig

    assert tok.vocab_size == 49152 == RecipeConfig().padded_vocab_size(tok.vocab_size)
    assert all(len(tok.encode(f"</{tag}>")) > 1 for tag in ("search", "calc", "answer", "value"))


class ScriptedModel(torch.nn.Module):
    """Stands in for the GPTModel under the real `Generator`: every prefill (a new turn)
    starts the next scripted turn, and each forward pass makes that turn's next id the best
    of the tokenizer's vocabulary. The padded rows of the embedding past the vocabulary get the
    highest logits of all, which the generator must mask. Records the context of each prefill:
    what the model read."""

    def __init__(self, turns: list[list[int]], vocab_size: int, padded: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the generator reads the device here
        self.config = SimpleNamespace(sequence_parallel=False)
        self.turns, self.vocab_size, self.padded = iter(turns), vocab_size, padded
        self.read: list[list[int]] = []

    def forward(self, tokens, positions, mask, inference_context=None, runtime_gather_output=True):
        if inference_context.sequence_len_offset == 0:
            self.script, self.at = list(next(self.turns)), 0
            self.read.append(tokens[0].tolist())
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.padded)
        logits[..., self.vocab_size:] = 20.0
        logits[:, -1, self.script[self.at]] = 10.0  # IndexError: the turn never stopped
        self.at += 1
        return logits


@pytest.fixture
def generator_for(megatron_cpu, tok):
    def make(turns, tokenizer=tok):
        model = ScriptedModel(turns, tokenizer.vocab_size, tokenizer.vocab_size + 128)
        return Generator(model, tokenizer, max_sequence_length=2048)
    return make


def test_generation_stops_on_a_closing_tag_whose_last_token_merges(tok, generator_for):
    """"</calc" then the token "></": the tag is complete inside that token. The completion
    ends with it as sampled (nothing cut, nothing re-tokenized), and the environment reads the
    action up to its closing tag."""
    merged = tok.encode("></")
    assert len(merged) == 1
    turn = tok.encode("<calc> 6*7 </calc") + merged + tok.encode(" never sampled")
    period = tok.encode("<answer> 42 </answer") + tok.encode(">.") + tok.encode(" no")
    gen = generator_for([turn, period])
    stops = V1.stop_texts()
    (out,) = gen.generate([tok.encode("Compute.")], Sampling(max_new_tokens=64), stops)
    assert out.stop == "stop" and out.ids == turn[:len(turn) - len(tok.encode(" never sampled"))]
    assert tok.decode(out.ids) == "<calc> 6*7 </calc></"
    assert all(i < tok.vocab_size for i in out.ids)
    (out,) = gen.generate([tok.encode("Answer.")], Sampling(max_new_tokens=64), stops)
    assert tok.decode(out.ids) == "<answer> 42 </answer>."
    env = MathEnv()
    env.reset(Task("m0", "math", "What is 6*7?", ("42",)))
    assert env.step("<calc> 6*7 </calc></").observation == "<result>42</result>"


def test_an_instruct_models_end_of_message_ends_the_turn_and_the_episode(smollm2_dir, tok,
                                                                         generator_for):
    """SmolLM2 answers in prose and closes its message with <|im_end|> (its eos): the turn ends
    there (the token kept, as sampled) and so does the episode, instead of decoding to
    max_new_tokens and handing the environment a turn without an action."""
    chat = HFTokenizer(str(smollm2_dir), chat_template=True)
    prose = tok.encode("The answer is 42.") + [tok.eod] + tok.encode(" never sampled")
    gen = generator_for([prose], chat)
    task = Task("m0", "math", "What is 6*7?", ("42",))
    (record,) = run_episodes(gen, [task], lambda t: MathEnv(), Sampling(max_new_tokens=64),
                             progress=False)
    assert [(t.ids, t.stop, t.observation) for t in record.turns] == [
        (prose[:prose.index(tok.eod) + 1], "eos", None)]
    assert record.ended == "eos" and not record.success


def test_episode_ids_are_the_prompt_the_samples_and_the_observations(smollm2_dir, tok,
                                                                      generator_for):
    """The agent loop on the scripted model, with the chat template: the episode opens with
    `episode_prompt` (what preprocessing trains on), each turn's ids are the sampled ids, and
    FC-RL's training sequence is those ids with the loss on the sampled ones only."""
    chat = HFTokenizer(str(smollm2_dir), chat_template=True)
    foresight = ("<foresight><plan>Compute 6*7, then answer.</plan><rollout>42</rollout>"
                 "<value>0.9</value></foresight>\n")
    first = tok.encode(foresight + "<calc> 6*7 </calc") + tok.encode("></")
    second = tok.encode(foresight + "<answer> 42 </answer>")
    gen = generator_for([first, second], chat)
    task = Task("m0", "math", "What is 6*7?", ("42",))
    (record,) = run_episodes(gen, [task], lambda t: MathEnv(), Sampling(max_new_tokens=128),
                             progress=False)
    assert record.ended == "answer" and record.success
    opening = chat.encode(episode_prompt(chat, record.prompt))
    assert record.ids[:len(opening)] == opening
    assert [t.ids for t in record.turns] == [first, second]
    newline = tok.encode("\n")
    observation = tok.encode("<result>42</result>")
    assert record.ids == opening + first + newline + observation + newline + second + newline
    assert gen.model.read == [opening, opening + first + newline + observation + newline]

    sample = to_sample(ScoredEpisode(record, [], {}, token_rewards=torch.zeros(len(record.ids))),
                       4096, chat.pad)
    n = len(record.ids) - 1
    assert sample["tokens"][:n].tolist() == record.ids[:-1]
    assert sample["labels"][:n].tolist() == record.ids[1:]
    trained = [record.ids[j + 1] for j in range(n) if sample["loss_mask"][j]]
    assert trained == first + second
    mask, _ = agent_tokens(record)
    assert [i for i, m in zip(record.ids, mask) if m] == first + second


def test_credit_spans_cover_multi_token_blocks(tok):
    text = ("<foresight><plan>Search for \"Freedonia\".</plan><rollout>Doc 1 (Title: Freedonia) "
            "Its capital is Fredville.</rollout><value>0.75</value></foresight>\n"
            "<search> capital of Freedonia </search>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    spans = credit_spans(tok, ids, text)
    for kind, (a, b) in char_spans(text).items():
        start, end = spans[kind]
        block = text[a:b]
        assert block in tok.decode(ids[start:end])
        assert block not in tok.decode(ids[start + 1:end])  # the smallest such range
        assert block not in tok.decode(ids[start:end - 1])
    assert set(spans) == {"plan", "rollout", "value"}


# The instruction that opens an episode: a template file per environment, which a task set may
# replace with its own (`tasks[].options.prompt_template`).


def test_the_default_prompts_are_the_package_templates():
    from megatron_foresight.envs import registry
    from megatron_foresight.envs.base import PROMPTS
    from megatron_foresight.envs.registry import EnvContext

    task = Task("m0", "math", "What is 6*7?", ("42",))
    env = registry.get("math").make(registry.get("math").options(), EnvContext(PROMPTS))()
    assert env.reset(task) == (
        "Solve the problem. You can use a calculator: write <calc> expression </calc> (numbers, "
        "+ - * / ^, parentheses) and the value comes back between <result> and </result>. Give "
        "the final answer as <answer> ... </answer>.\nProblem: What is 6*7?")
    assert SEARCH_PROMPT == (PROMPTS / "search.txt").read_text().removesuffix("\n")


def test_a_task_set_names_its_own_prompt_template(tmp_path):
    from megatron_foresight.envs import registry
    from megatron_foresight.envs.registry import EnvContext

    template = tmp_path / "gsm8k.txt"
    template.write_text("Use <calc> 1+1 </calc>; answer in <answer> </answer>, {{no}} braces.\n"
                        "Q: {question}\n")
    spec = registry.get("math")
    options = spec.options(prompt_template=str(template))
    spec.check(options)
    env = spec.make(options, EnvContext(tmp_path))()
    assert env.reset(Task("m0", "math", "2+2?", ("4",))) == (
        "Use <calc> 1+1 </calc>; answer in <answer> </answer>, {no} braces.\nQ: 2+2?")


@pytest.mark.parametrize("text, error", [
    ("Answer it.", "no {question} placeholder"),
    ("{question} and {answer}", r"unknown placeholder \{answer\}"),
    ("{question} {", "literal brace"),
])
def test_a_bad_prompt_template_is_one_line_naming_the_file(tmp_path, text, error):
    from megatron_foresight.envs import registry

    template = tmp_path / "mine.txt"
    template.write_text(text)
    for env, more in (("math", {}), ("search", {"corpus": "never read.jsonl"})):
        options = registry.get(env).options(prompt_template=str(template), **more)
        with pytest.raises(UsageError, match=error) as e:
            registry.get(env).check(options)
        assert str(template) in str(e.value) and "\n" not in str(e.value)
