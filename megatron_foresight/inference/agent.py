"""The multi-turn agent loop on the Megatron model: generate a turn until a closing action tag,
hand its text to the environment, append the observation, continue until the episode ends.

Token in, token out: the ids the model sampled stay in the context as they are (the text is
decoded only to hand it to the environment); each observation is encoded once and its ids are
appended. The context is laid out as training renders a transcript (`data.render.transcript`):
prompt, newline, then each turn followed by a newline.

Two schedules play the same episodes. By rounds (the default): every episode in a batch
advances one turn per round; each round re-reads the episode's context (prefill) and decodes the
new turn with the KV cache, and rows that end their turn early idle until the batch's longest
turn ends. Continuously (`continuous=True`, `inference.continuous`): each episode holds a KV-cache
slot for its whole life; a turn that ends hands its text to the environment (on a thread, so
the environment runs while the other slots decode), the observation is appended to the
episode's own cache (only the new tokens are prefilled) and it decodes on; a finished episode's
slot goes to the next queued one. The decode batch stays full.

The continuous schedule depends only on the drawn tokens and step counts, never on thread
timing: observations are collected at fixed points (a refill, which waits for the environment
if it is not done), so every rank takes the same decisions. Its rows draw from per-row streams
seeded by (seed, episode, turn) (`row_seed`); the round schedule draws that way with
`row_streams=True` and then samples the same tokens. The RL rollout builds on this loop.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from tqdm import tqdm

from megatron_foresight.tasks import Task
from megatron_foresight.data.tokenizer import episode_prompt
from megatron_foresight.envs.base import Episode
from megatron_foresight.foresight.format import final_observation, observation_content
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.inference.continuous import SlotEngine
from megatron_foresight.inference.generate import Completion, Generator, Sampling

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


def row_seed(seed: int, episode: int, turn: int) -> int:
    """The seed of episode `episode`'s turn `turn` when every row draws from its own stream."""
    return ((seed * 1_000_003 + episode) * 1_009 + turn) % 2**63


def run_episodes(generator: Generator, tasks: Sequence[Task], make_env: Callable[[Task], Episode],
                 sampling: Sampling, batch_size: int = 16, progress: bool = True,
                 fmt: ForesightFormat | None = V1, continuous: bool = False,
                 row_streams: bool = False) -> list[EpisodeRecord]:
    """Play every task once; returns one record per task, in order. The prompt asks for the
    foresight format `fmt` (as FE-SFT's traces of that version do), and a turn ends where that
    version's action ends; `fmt=None` asks for none (turns end at any action's closing tag).
    `continuous`, `row_streams`: as `play_episodes`."""
    records, envs = start_episodes(generator.tokenizer, tasks, make_env, fmt)
    bar = tqdm(total=len(tasks), desc="episodes", unit=" ep", disable=None if progress else True)
    play_episodes(generator, records, envs, sampling, batch_size, fmt,
                  on_end=lambda record: bar.update(1), continuous=continuous,
                  row_streams=row_streams)
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
                  on_end: Callable[[EpisodeRecord], None] | None = None,
                  continuous: bool = False, row_streams: bool = False,
                  streams: Sequence[tuple[int, int]] | None = None) -> None:
    """Play started episodes to their end, in place: each record's `ids` are the context so far
    and its env is in the state that follows them (`start_episodes`, or a state partway through
    an episode, which `data collect`'s Monte-Carlo continuations start from). `on_end` is
    called with each record as its episode ends. `continuous`: the slot schedule, with
    `batch_size` slots (per-row streams always). `row_streams`: the round schedule draws from
    per-row streams too (one stream per batch otherwise). `streams`: record i's per-row
    streams are `row_seed(*streams[i], turn)` (default `(sampling.seed, i)`), so episodes
    from several calls can share one (`data collect` batches the samples of several tasks)
    and still draw what each would alone."""
    stops = (fmt or V1).stop_texts()
    tok = generator.tokenizer
    newline = _encode(tok, "\n")
    if streams is None:
        streams = [(sampling.seed, i) for i in range(len(records))]
    if len(streams) != len(records):
        raise ValueError(f"{len(streams)} streams for {len(records)} episodes")
    if continuous:
        with generator.for_decoding():
            _Continuous(generator, records, envs, sampling, batch_size, stops, on_end,
                        streams).run()
        return
    active = [i for i, r in enumerate(records) if not r.ended]
    calls = 0
    while active:
        for start in range(0, len(active), batch_size):
            chunk = active[start:start + batch_size]
            # a new seed per call: turns must not replay the same random draws
            seeded = replace(sampling, seed=sampling.seed + 7_919 * calls)
            calls += 1
            prompts = [records[i].ids for i in chunk]
            if row_streams:
                outs = generator.generate(prompts, sampling, stops, row_seeds=[
                    row_seed(*streams[i], len(records[i].turns)) for i in chunk])
            else:
                outs = generator.generate(prompts, seeded, stops)
            for i, out in zip(chunk, outs):
                if _advance(records[i], envs[i], out, tok, newline) and on_end is not None:
                    on_end(records[i])
        active = [i for i in active if not records[i].ended]


def _advance(record: EpisodeRecord, env: Episode, out, tok, newline: list[int]) -> bool:
    """Give one generated turn to the environment; True when the episode ended."""
    return _apply(record, out, _env_step(env, out, tok), tok, newline)


def _env_step(env: Episode, out: Completion, tok):
    """The environment's reply to a turn; None when the turn ends the episode without one
    (out of room, or the model ended its message)."""
    return None if out.stop in ("context", "eos") else env.step(tok.decode(out.ids))


def _apply(record: EpisodeRecord, out: Completion, step, tok, newline: list[int]) -> bool:
    """Record one turn and the environment's reply to it; True when the episode ended."""
    text = tok.decode(out.ids)
    start = len(record.ids)
    record.ids += out.ids + newline
    if step is None:
        record.turns.append(AgentTurnRecord(text, out.ids, out.logprobs, None, out.stop, start))
        record.ended = out.stop
        return True
    record.turns.append(AgentTurnRecord(text, out.ids, out.logprobs, step.observation, out.stop,
                                        start))
    if step.done:
        record.success = bool(step.info.get("success", False))
        record.reward, record.info = step.reward, step.info
        record.ended = "answer" if "answer" in step.info else step.info.get("reason", "done")
        return True
    record.ids += _encode(tok, step.observation) + newline
    return False


class _Continuous:
    """The continuous schedule (module docstring). A slot is free, running a turn (in the
    engine) or waiting: its turn ended and the environment's reply is pending."""

    def __init__(self, generator, records, envs, sampling, slots, stops, on_end, streams):
        self.records, self.envs, self.sampling, self.on_end = records, envs, sampling, on_end
        self.streams = streams
        self.tok = generator.tokenizer
        self.newline = _encode(self.tok, "\n")
        self.engine = SlotEngine(generator, slots, sampling, stops)
        self.queue = deque(i for i, r in enumerate(records) if not r.ended)
        self.held: list[int | None] = [None] * slots
        self.waiting: dict[int, tuple[Completion, Future | None]] = {}
        # Refilling costs a prefill forward and may wait for an environment: gather a few
        # slots' worth before doing it, unless nothing is left to decode.
        self.refill_at = max(1, slots // 4)

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=min(len(self.held), 8)) as pool:
            self.pool = pool
            while self.queue or any(i is not None for i in self.held):
                claimable = len(self.waiting) + (self.held.count(None) if self.queue else 0)
                if claimable and (not self.engine.turns or claimable >= self.refill_at):
                    self._refill()
                for slot, out in self.engine.step() if self.engine.turns else ():
                    env = self.envs[self.held[slot]]
                    self.waiting[slot] = (out, pool.submit(_env_step, env, out, self.tok))

    def _refill(self) -> None:
        """In slot order: waiting episodes take their observation and run on (or end and free
        their slot), then queued episodes take the free slots."""
        for slot in sorted(self.waiting):
            out, reply = self.waiting.pop(slot)
            i = self.held[slot]
            if _apply(self.records[i], out, reply and reply.result(), self.tok, self.newline):
                self.held[slot] = None
                if self.on_end is not None:
                    self.on_end(self.records[i])
            else:
                self._begin(slot)
        for slot in range(len(self.held)):
            if self.held[slot] is None and self.queue:
                self.held[slot] = self.queue.popleft()
                self.engine.free(slot)
                self._begin(slot)

    def _begin(self, slot: int) -> None:
        """Start the held episode's next turn: prefill what its slot does not hold yet."""
        i = self.held[slot]
        record = self.records[i]
        out = self.engine.start(slot, record.ids[self.engine.cached(slot):],
                                row_seed(*self.streams[i], len(record.turns)))
        if out is not None:  # no room for a turn
            self.waiting[slot] = (out, None)
