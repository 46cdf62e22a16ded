"""The multi-turn agent loop on the Megatron model: generate a turn until a closing action tag,
hand its text to the environment, append the observation, continue until the episode ends.

Token in, token out: the ids the model sampled stay in the context as they are (the text is
decoded only to hand it to the environment); each observation is encoded once and its ids are
appended. The context is laid out as training renders a transcript (`data.render.transcript`):
prompt, newline, then each turn followed by a newline.

Every episode in a batch advances one turn per round; each round re-reads the episode's context
(prefill) and decodes the new turn with the KV cache. The RL rollout builds on this loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from tqdm import tqdm

from megatron_foresight.tasks import Task
from megatron_foresight.data.tokenizer import episode_prompt
from megatron_foresight.envs.base import Episode
from megatron_foresight.foresight.format import final_observation, observation_content
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.inference.generate import Generator, Sampling

V1 = FORMATS["v1"]


@dataclass
class AgentTurnRecord:
    text: str
    """What the agent wrote (decoded from `ids`)."""
    ids: list[int]
    logprobs: list[float]
    observation: str | None
    """The environment's reply; None when the turn ended the episode."""
    stop: str
    """Why generation ended: stop (an action tag), eos, length, or context."""
    start: int = 0
    """Where `ids` begin in the episode's `ids` (the context the model read)."""


@dataclass
class EpisodeRecord:
    task: Task
    prompt: str
    turns: list[AgentTurnRecord] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    ended: str = ""
    """How it ended: answer, max_turns, context (the sequence limit), eos (the model ended its
    message without an action), or no_action."""
    ids: list[int] = field(default_factory=list)
    """The whole episode as the model read and wrote it."""
    info: dict = field(default_factory=dict)
    """What the environment said of the end (search: the answer's token F1 as `f1`)."""

    def observed(self, k: int) -> str:
        """What turn k's rollout is scored against: the content of the observation that
        followed it, or for the turn that ended the episode, `format.final_observation`."""
        turn = self.turns[k]
        if turn.observation is not None:
            return observation_content(turn.observation)
        return final_observation(self.success if self.ended == "answer" else None)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def run_episodes(generator: Generator, tasks: Sequence[Task], make_env: Callable[[Task], Episode],
                 sampling: Sampling, batch_size: int = 16, progress: bool = True,
                 fmt: ForesightFormat | None = V1) -> list[EpisodeRecord]:
    """Play every task once; returns one record per task, in order. The prompt asks for the
    foresight format `fmt` (as FE-SFT's traces of that version do), and a turn ends where that
    version's action ends; `fmt=None` asks for none (turns end at any action's closing tag)."""
    records, envs = start_episodes(generator.tokenizer, tasks, make_env, fmt)
    bar = tqdm(total=len(tasks), desc="episodes", unit=" ep", disable=None if progress else True)
    play_episodes(generator, records, envs, sampling, batch_size, fmt,
                  on_end=lambda record: bar.update(1))
    bar.close()
    return records


def start_episodes(tok, tasks: Sequence[Task], make_env: Callable[[Task], Episode],
                   fmt: ForesightFormat | None = V1) -> tuple[list[EpisodeRecord], list[Episode]]:
    """Each task's episode before its first turn: a fresh environment, reset, and the record
    holding the prompt (with `fmt`'s instruction) as ids."""
    records, envs = [], []
    for task in tasks:
        env = make_env(task)
        prompt = env.reset(task)
        prompt = fmt.prompt(prompt) if fmt is not None else prompt
        # the opening training renders for this prompt (`data.preprocess`), chat template or not
        records.append(EpisodeRecord(task, prompt, ids=_encode(tok, episode_prompt(tok, prompt))))
        envs.append(env)
    return records, envs


def play_episodes(generator: Generator, records: list[EpisodeRecord], envs: list[Episode],
                  sampling: Sampling, batch_size: int = 16, fmt: ForesightFormat | None = V1,
                  on_end: Callable[[EpisodeRecord], None] | None = None) -> None:
    """Play started episodes to their end, in place: each record's `ids` are the context so far
    and its env is in the state that follows them (`start_episodes`, or a state partway through
    an episode, which `data collect`'s Monte-Carlo continuations start from). `on_end` is
    called with each record as its episode ends."""
    stops = (fmt or V1).stop_texts()
    tok = generator.tokenizer
    newline = _encode(tok, "\n")
    active = [i for i, r in enumerate(records) if not r.ended]
    calls = 0
    while active:
        for start in range(0, len(active), batch_size):
            chunk = active[start:start + batch_size]
            # a new seed per call: turns must not replay the same random draws
            seeded = replace(sampling, seed=sampling.seed + 7_919 * calls)
            calls += 1
            outs = generator.generate([records[i].ids for i in chunk], seeded, stops)
            for i, out in zip(chunk, outs):
                if _advance(records[i], envs[i], out, tok, newline) and on_end is not None:
                    on_end(records[i])
        active = [i for i in active if not records[i].ended]


def _advance(record: EpisodeRecord, env: Episode, out, tok, newline: list[int]) -> bool:
    """Give one generated turn to the environment; True when the episode ended."""
    text = tok.decode(out.ids)
    start = len(record.ids)
    record.ids += out.ids + newline
    if out.stop in ("context", "eos"):  # out of room, or the model ended its message
        record.turns.append(AgentTurnRecord(text, out.ids, out.logprobs, None, out.stop, start))
        record.ended = out.stop
        return True
    step = env.step(text)
    record.turns.append(AgentTurnRecord(text, out.ids, out.logprobs, step.observation, out.stop,
                                        start))
    if step.done:
        record.success = bool(step.info.get("success", False))
        record.reward, record.info = step.reward, step.info
        record.ended = "answer" if "answer" in step.info else step.info.get("reason", "done")
        return True
    record.ids += _encode(tok, step.observation) + newline
    return False
