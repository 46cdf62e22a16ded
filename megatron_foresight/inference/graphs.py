"""CUDA graphs for the decode step of continuous batching (`inference.continuous`).

At the batch sizes of agent rollouts a decode step on a GPU is bound by launching kernels, not
by arithmetic: each layer launches a dozen or more, each costing microseconds of host time. A
CUDA graph records the step's kernels once and replays them with one launch. A graph replays
fixed shapes at fixed addresses, so the graphed step is the engine's decode step in a static
form (`FixedDecodeStep`):

- every slot is a row, running or not. A slot without a running turn decodes a throwaway
  token at its own length, the position its next token goes to, which the next prefill of that
  slot overwrites (a slot never holds more than max_sequence_length - 1 tokens between turns:
  a turn ends when its last drawn token would not fit);
- attention reads K key positions for every row, masked per row at its own length; K is the
  smallest of a few buckets (`key_buckets`) above the longest slot, one graph per bucket;
- the step's description (positions, mask) lives in tensors that keep their addresses and are
  refreshed in place before each replay; the RoPE angles at those positions are gathered inside
  the graph (`SlotSelfAttention` caches them per step object: the cache is emptied at the start
  of every forward, so capture records the gather).

A bucket's graph is captured on the first step that needs it, after a warm-up run on a side
stream (first calls allocate: the KV cache, RoPE tables, cuBLAS workspaces), into one memory
pool shared by the buckets. Graphs live as long as their engine (one `play_episodes` call: an
FC-RL step captures its buckets again; keeping the engine's cache and graphs across steps would
save that, if a GPU shows it matters). Tensor parallelism is allowed (NCCL collectives are captured);
pipeline parallelism is not (a stage hand-off sends the shape first, a host read).

Run on one H200 (2026-12-04, `tools/cuda_check.sh`, TP = 1): `tests/test_cuda.py` drew the same
tokens as Megatron's forward with real graphs, fp32 and bf16, greedy and sampled, and the
rollout benchmark's single-turn decode made 2.1x the fused step's tokens/s with them (README,
"Check the CUDA path first"). Multi-turn episodes with graphs and TP > 1 were not run there. On
the CPU the static step is tested against the engine's own decode step (the same tokens) and
checked to read nothing back to the host while it runs (a captured graph cannot); there
`torch.cuda.CUDAGraph` is replaced by a stand-in that re-runs the captured function, and the
test says so in its name.
"""

from __future__ import annotations

import torch

from megatron_foresight.errors import UsageError
from megatron_foresight.inference.slots import StepCache
from megatron_foresight.models import rope

SMALLEST_BUCKET = 128


def key_buckets(max_sequence_length: int) -> list[int]:
    """Key lengths with a graph each: 128, 256, ... doubling, and max_sequence_length last."""
    buckets, k = [], SMALLEST_BUCKET
    while k < max_sequence_length:
        buckets.append(k)
        k *= 2
    return buckets + [max_sequence_length]


class FixedDecodeStep(StepCache):
    """One decode token for each of S slots, reading K keys: the attributes of
    `slots._Step` that `SlotSelfAttention` reads, in tensors that keep their addresses."""

    queries = 1
    valid_BN = None

    def __init__(self, slots: int, keys: int, device):
        self.slots, self.new, self.keys = list(range(slots)), [1] * slots, keys
        self.view = slice(0, slots)
        self.slot_B = torch.arange(slots, device=device)
        self.write_slot = self.slot_B
        self.pos_BN = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.write_pos = self.pos_BN[:, 0]
        self.key_T = torch.arange(keys, device=device)
        self.keep_BNT = torch.zeros(slots, 1, keys, dtype=torch.bool, device=device)
        self.cos_sin: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_tokens(self, x_NBGD: torch.Tensor) -> torch.Tensor:
        return x_NBGD[0]


class CudaGraphs:
    """Capture and replay on CUDA (`torch.cuda.CUDAGraph`), one pool for all graphs."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, run):
        """Warm `run` up on a side stream, then record it: (replay, its output tensor)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph.replay, out


class DecodeGraphs:
    """The graphed decode steps of one `SlotEngine`: `decode` replaces its decode forward."""

    def __init__(self, generator, context):
        if generator.pipelined:
            raise UsageError("CUDA graphs of the decode step need pipeline parallelism 1 (a "
                             "stage hand-off reads the tensor's shape on the host)")
        self.g, self.context = generator, context
        self.backend = CudaGraphs()
        self.buckets = key_buckets(context.max_sequence_length)
        self.tokens_S1 = torch.full((context.slots, 1), generator.pad_id, dtype=torch.long,
                                    device=generator.device)
        self.graphs: dict[int, tuple] = {}
        """Per bucket: its step, the graph's replay and its output (logits [S, V])."""
        self.tables: list = []

    def decode(self, slots: list[int], pending: list[int]) -> torch.Tensor:
        """One decode step of the running `slots`, each appending its pending token: their
        logits [len(slots), V], in `slots` order. Advances those slots' lengths."""
        lengths = self.context.lengths
        keys = next(k for k in self.buckets if k > max(lengths))
        tokens = [self.g.pad_id] * self.context.slots
        for s, t in zip(slots, pending):
            tokens[s] = t
        if keys not in self.graphs:
            step = FixedDecodeStep(self.context.slots, keys, self.g.device)
            self._set(step, tokens, lengths)
            self.graphs[keys] = (step, *self.backend.capture(lambda: self._forward(step)))
            # the graph reads RoPE tables from `models.rope`'s cache by address: hold them
            # here, so that the cache letting go of one cannot free memory a replay reads
            self.tables = list(rope._tables.values())
        step, replay, logits_SV = self.graphs[keys]
        self._set(step, tokens, lengths)
        replay()
        for s in slots:
            lengths[s] += 1
        return logits_SV[torch.tensor(slots, device=logits_SV.device)]

    def _set(self, step: FixedDecodeStep, tokens: list[int], lengths: list[int]) -> None:
        dev = self.g.device
        self.tokens_S1.copy_(torch.tensor(tokens, dtype=torch.long)[:, None].to(dev))
        step.pos_BN.copy_(torch.tensor(lengths, dtype=torch.long)[:, None].to(dev))

    def _forward(self, step: FixedDecodeStep) -> torch.Tensor:
        """The captured work: the mask from the positions, then the model's forward."""
        torch.le(step.key_T, step.pos_BN[..., None], out=step.keep_BNT)
        step.cos_sin.clear()  # gathered in this forward, so a replay gathers at its positions
        self.context.step = step
        try:
            return self.g._forward(self.tokens_S1, step.pos_BN, None, self.context)
        finally:
            self.context.step = None
