"""Continuous batching: S sequences decode side by side in the slots of a `SlotContext`, and a
sequence can join (prefill) or leave between any two decode steps without the others waiting.

The engine here knows turns, not episodes: `start` begins a turn in a slot (the tokens to append
to what the slot holds, then sampling until a stop string, eos or the length limit, by the same
rules and the same `Completion` as `Generator.generate`), `step` runs one forward and returns the
turns it ended. The agent loop (`inference.agent`) decides which episode holds which slot.

Every row draws from its own generator, so a row's tokens do not depend on which rows share its
forward; with the same seeds it samples what `Generator.generate(..., row_seeds=...)` samples.
The forward, the draw and the pipeline hand-offs are the `Generator`'s (`_forward`,
`_next_tokens`): with pipeline parallelism each stage keeps the caches of its own layers and all
ranks see the same drawn tokens, so every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megatron_foresight.inference.generate import (
    Completion, Generator, Sampling, _distinct,
)
from megatron_foresight.runtime.compat import device_mode_off


@dataclass
class _Turn:
    completion: Completion
    limit: int
    """Room for new tokens (max_new_tokens, or less near the sequence limit)."""
    gen: torch.Generator
    pending: list[int]
    """Tokens to append before the next draw: the prefill, then each drawn token."""


class SlotEngine:
    """Turns in `slots` KV-cache slots of `generator`'s model. Decode forwards are counted in
    `generator.stats`, as the generator's own are."""

    def __init__(self, generator: Generator, slots: int, sampling: Sampling,
                 stop_texts: tuple[str, ...], shared_seed: int | None = None):
        """`shared_seed`: every turn started without a seed of its own draws from one stream
        seeded so, in one call per forward over its rows in slot order (as
        `Generator.generate` draws for a batch). Decode steps replay CUDA graphs when the
        generator asks for them (`inference.graphs`)."""
        from megatron_foresight.inference.fused import FusedDecode
        from megatron_foresight.inference.graphs import DecodeGraphs
        from megatron_foresight.inference.slots import SlotContext  # imports Megatron

        self.g = generator
        self.sampling = sampling
        self.stop_ids, self.stop_tail = generator.stop_condition(stop_texts)
        self.context = SlotContext(slots, generator.max_sequence_length)
        self.turns: dict[int, _Turn] = {}
        self.stats = generator.stats
        self.stream = None if shared_seed is None else torch.Generator().manual_seed(shared_seed)
        self.graphs = DecodeGraphs(generator, self.context) if generator.cuda_graphs else None
        # a model in training mode (dropout live) decodes through Megatron's forward
        self.fused = FusedDecode(generator.model, generator.tokenizer.vocab_size) \
            if generator.fused_decode and not generator.model.training else None

    def cached(self, slot: int) -> int:
        """How many tokens slot `slot` holds."""
        return self.context.lengths[slot]

    def free(self, slot: int) -> None:
        """Forget slot `slot`'s sequence; the next `start` there begins a new one."""
        self.context.lengths[slot] = 0

    def start(self, slot: int, tokens: list[int], seed: int | None) -> Completion | None:
        """Begin a turn in `slot`: append `tokens`, then generate, drawing from a stream seeded
        `seed` (None: the engine's shared stream). Returns the turn at once (empty,
        stop="context") when the sequence has no room left, as `generate` does."""
        total = self.cached(slot) + len(tokens)
        room = self.g.max_sequence_length - total
        if room <= 0:
            return Completion(stop="context")
        gen = self.stream if seed is None else torch.Generator().manual_seed(seed)
        if gen is None:
            raise ValueError("a turn without a seed needs the engine's shared_seed")
        self.turns[slot] = _Turn(Completion(), min(self.sampling.max_new_tokens, room), gen,
                                 list(tokens))
        return None

    @torch.no_grad()
    def step(self) -> list[tuple[int, Completion]]:
        """One forward: the prefill of every turn started since the last step, or else one
        decode step of all running turns. Returns (slot, completion) of the turns it ended."""
        prefill = [s for s in sorted(self.turns) if not self.turns[s].completion.ids]
        slots = prefill or sorted(self.turns)
        if prefill:
            logits_BV = self._prefill(slots)
        else:
            with device_mode_off() if self.g.mode_off else contextlib.nullcontext():
                if self.graphs is not None:
                    logits_BV = self.graphs.decode(slots, [self.turns[s].pending[0]
                                                           for s in slots])
                elif self.fused is not None:
                    logits_BV = self._fused_decode(slots)
                else:
                    logits_BV = self._run(slots, [self.turns[s].pending for s in slots])
            self.stats.add(len(slots))
        gens = [self.turns[s].gen for s in slots]
        shared = self.stream is not None and all(g is self.stream for g in gens)
        ids_B, logp_B = self.g._next_tokens(logits_BV, len(slots), self.sampling,
                                            self.stream if shared else gens)
        ended = []
        for s, tok, lp in zip(slots, ids_B.tolist(), logp_B.tolist()):
            turn = self.turns[s]
            turn.completion.ids.append(tok)
            turn.completion.logprobs.append(lp)
            turn.pending = [tok]
            if self.g._ends(turn.completion, turn.limit, self.sampling, self.stop_ids,
                            self.stop_tail):
                ended.append((s, self.turns.pop(s).completion))
        return ended

    def _prefill(self, slots: list[int]):
        """Rows that start from an empty slot with the same tokens (a GRPO group's prompt) are
        prefilled once and their caches copied, when the generator shares prefills."""
        rows = [self.turns[s].pending for s in slots]
        fresh = [s for s in slots if self.cached(s) == 0]
        firsts, source = _distinct([self.turns[s].pending for s in fresh]) \
            if self.g.shared_prefill and fresh else (None, None)
        if source is None:
            return self._run(slots, rows)
        owner = {s: fresh[firsts[source[u]]] for u, s in enumerate(fresh)}
        run = [s for s in slots if owner.get(s, s) == s]
        logits_RV = self._run(run, [self.turns[s].pending for s in run])
        for s, o in owner.items():
            if o != s:
                self.context.copy_prefix(o, s)
        if logits_RV is None:
            return None
        index = {s: r for r, s in enumerate(run)}
        return logits_RV[torch.tensor([index[owner.get(s, s)] for s in slots],
                                      device=logits_RV.device)]

    def _fused_decode(self, slots: list[int]) -> torch.Tensor:
        """One decode step of `slots` by `inference.fused`: their logits [B, V]."""
        dev = self.g.device
        tokens_B = torch.tensor([self.turns[s].pending[0] for s in slots], device=dev)
        self.context.begin(slots, [1] * len(slots), dev)
        try:
            return self.fused.logits(self.context, tokens_B)
        finally:
            self.context.end()

    def _run(self, slots: list[int], rows: list[list[int]]):
        """Append rows[b] to slot slots[b] (left-padded to the longest), one forward; the
        last position's logits [B, V], or None before the last pipeline stage."""
        dev = self.g.device
        n = max(len(r) for r in rows)
        tokens_BN = torch.full((len(rows), n), self.g.pad_id, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            tokens_BN[b, n - len(r):] = torch.tensor(r, dtype=torch.long)
        self.context.begin(slots, [len(r) for r in rows], dev)
        positions_BN = self.context.step.pos_BN.clamp(min=0)
        try:
            return self.g._forward(tokens_BN, positions_BN, None, self.context)
        finally:
            self.context.end()


def generate(generator: Generator, prompts: list[list[int]], sampling: Sampling,
             stop_texts: tuple[str, ...] = (), row_seeds: list[int] | None = None
             ) -> list[Completion]:
    """`Generator.generate` on the slot KV cache: row b in slot b, all decoded side by side, a
    row that ends leaving the forward. Row b draws from its own stream seeded `row_seeds[b]`,
    or without them the rows draw from one stream seeded `sampling.seed`, in row order, as
    the static path does: the same tokens as `Generator.generate` either way."""
    engine = SlotEngine(generator, len(prompts), sampling, stop_texts,
                        shared_seed=sampling.seed if row_seeds is None else None)
    out = [engine.start(b, p, None if row_seeds is None else row_seeds[b])
           for b, p in enumerate(prompts)]
    with generator.for_decoding():
        while engine.turns:
            for slot, completion in engine.step():
                out[slot] = completion
    return out
