"""Sampling from a Megatron `GPTModel` with a KV cache, batched, on any device.

Megatron-Core's static inference context holds the cache; the decode loop is ours (its dynamic
engine needs flash-attn, and an agent loop needs control between turns: stop on a closing tag,
hand the text to an environment, continue). Rows of a batch have different lengths, so prompts
are left-padded and the padding is hidden from attention by an explicit mask. RoPE depends only
on the distance between positions, so the shift that left-padding gives a row changes nothing.

Shapes: B rows, L padded prompt length, T = L + generated so far, V vocabulary.

Tensor parallelism: logits are gathered over the TP group and every TP rank draws from a
generator seeded the same way, so all ranks sample the same tokens. By default one generator
serves the whole batch; `row_seeds` gives each row its own, so a row's draws do not depend on
which rows share its batch (the continuous engine, `inference.continuous`, draws that way).

Sequence parallelism is switched off for the duration of `generate` (a decode step is one
token, which cannot be split over the TP ranks; Megatron's own inference refuses it): the layers
then all-reduce instead of reduce-scattering, with the same weights.

Pipeline parallelism (one model chunk per stage): every stage keeps the KV cache of its own
layers. Each forward passes the hidden states down the pipeline (shape first, then the tensor,
point to point); the last stage computes the logits and draws, and broadcasts the drawn ids and
their log-probabilities to the pipeline group, so every stage keeps the same rows, masks and
stop decisions and the agent loop above runs identically on all ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from megatron_foresight.errors import UsageError
from megatron_foresight.runtime.compat import device_mode_off


@dataclass(frozen=True)
class Sampling:
    """How to choose each next token."""

    temperature: float = 0.0
    """0: greedy (argmax); otherwise softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: draw only from the smallest set of tokens with this much probability."""
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One row's generated tokens. `logprobs[i]` is log p(ids[i]) under the distribution it was
    drawn from (temperature-scaled logits; plain logits when greedy). `stop` says why it ended:
    `stop` (a stop string), `eos` (the tokenizer's end-of-sequence token: an instruct model ends
    its message with it; kept in `ids` as sampled), `length` (max_new_tokens) or `context` (the
    sequence limit)."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop: str = "length"


@dataclass
class DecodeStats:
    """Decode forwards run and the rows they carried (how full the batch stayed)."""

    steps: int = 0
    rows: int = 0

    def add(self, rows: int) -> None:
        self.steps += 1
        self.rows += rows


def _draw(logits_BV: torch.Tensor, sampling: Sampling,
          gen: torch.Generator | list[torch.Generator], tp_src: tuple | None = None):
    """Next token per row and its log-probability; `gen` one generator for the batch, or one
    per row. `tp_src` (the TP group and its rank 0): a device draw takes that rank's tokens,
    since each rank's cumulative sums may differ in the last bit on CUDA."""
    logits_BV = logits_BV.float()
    if sampling.temperature == 0:
        ids_B = logits_BV.argmax(-1)
        return ids_B, torch.log_softmax(logits_BV, -1).gather(-1, ids_B[:, None])[:, 0]
    logp_BV = torch.log_softmax(logits_BV / sampling.temperature, -1)
    probs_BV = logp_BV.exp()
    if sampling.top_p < 1:
        sorted_p, order = probs_BV.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p  # keep the first token always
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order, sorted_p)
    if _draws_on_device(probs_BV.device):
        # one uniform per row from its (host) stream; the draw itself stays on the device
        u_B = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gen]) \
            if isinstance(gen, list) else \
            torch.rand(probs_BV.size(0), generator=gen, dtype=torch.float64)
        ids_B = inverse_cdf(probs_BV, u_B.to(probs_BV.device))
        if tp_src is not None:
            import torch.distributed as dist

            dist.broadcast(ids_B, tp_src[1], group=tp_src[0])
    elif isinstance(gen, list):
        ids_B = torch.cat([torch.multinomial(p[None], 1, generator=g)[0]
                           for p, g in zip(probs_BV.cpu(), gen)]).to(logits_BV.device)
    else:
        ids_B = torch.multinomial(probs_BV.cpu(), 1, generator=gen)[:, 0].to(logits_BV.device)
    return ids_B, logp_BV.gather(-1, ids_B[:, None])[:, 0]


def _draws_on_device(device: torch.device) -> bool:
    """Whether a draw stays on `device` (`inverse_cdf`) rather than copying the B x V
    probabilities to the host for `torch.multinomial` (CUDA: 39 MB a step at 152k tokens and
    64 rows, and a host multinomial per row). The host path, kept on the CPU, is what every
    figure measured here sampled."""
    return device.type == "cuda"


def inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Row b's token: the first whose cumulative probability exceeds u_B[b] (in [0, 1)) of the
    row's total, so token v is drawn with probability p_v / sum(p). One pass over the batch on
    its device; a token of probability 0 is never drawn (rounding at the top end falls back to
    the row's last token of positive probability); a row of NaN or of zeros is refused, as
    `torch.multinomial` refuses it (one host sync a step: the ids are read back anyway)."""
    cdf_BV = probs_BV.double().cumsum(-1)
    total_B = cdf_BV[:, -1]
    if not bool((total_B > 0).all()):  # NaN fails the comparison too; as torch.multinomial
        bad = (~(total_B > 0)).nonzero()[:, 0].tolist()
        raise RuntimeError(f"sampling: the probabilities of row(s) {bad} are not finite or sum "
                           "to 0 (the model's logits are NaN or -inf there)")
    target_B1 = (u_B.double() * total_B)[:, None]
    ids_B = torch.searchsorted(cdf_BV, target_B1, right=True)[:, 0]
    # the last token of positive probability: where the cumulative sum first reaches the total
    last_B = torch.searchsorted(cdf_BV, total_B[:, None])[:, 0]
    return torch.minimum(ids_B, last_B)


def _te_core_attention(model) -> bool:
    """Whether the model's layers use Transformer Engine's core attention (never on the CPU,
    where Transformer Engine does not import)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return any(isinstance(m, TEDotProductAttention) for m in model.modules())


def _distinct(rows: list[list[int]]) -> tuple[list[int], list[int] | None]:
    """The first row of each distinct prompt, and for every row the position of its prompt in
    that list; None instead when all rows differ (nothing to share)."""
    first: dict[tuple, int] = {}
    firsts, source = [], []
    for b, row in enumerate(rows):
        u = first.setdefault(tuple(row), len(first))
        if u == len(firsts):
            firsts.append(b)
        source.append(u)
    if len(firsts) == len(rows):
        return firsts, None
    return firsts, source


class Generator:
    """Batched generation from one model chunk per pipeline stage (TP and PP allowed; an
    interleaved pipeline is not).

    `max_sequence_length` bounds prompt + completion per row (the KV cache is allocated for it);
    rows whose prompt leaves no room end with stop="context" and no tokens.

    Three speed-ups, each switchable (benchmarks, tests): the tokens are those of the plain
    path, the log-probabilities equal to float rounding (sums in another order, ~1e-7):
    `slot_cache` (off by default): generate on continuous batching's slot KV cache
    (`inference.continuous`; per layer, keys [rows, groups, dim, length] and values
    [rows, groups, length, dim], RoPE tables shared by the layers, rows leave the forward as
    they end) instead of Megatron's static inference context, where the model supports it
    (`inference.slots.unsupported_by_slots`); always with Transformer Engine's core attention,
    which would not hide the static path's left padding. Measured on the tiny model
    (benchmarks/rollout_throughput.py, 2 cores): 1.08x the static lean path's tokens/s on
    single-turn decode, within the runs' spread, but 0.91x on episodes played by
    rounds (it allocates and zeroes max_sequence_length per row at every call). The others
    apply to the static path:
    `shared_prefill`: rows with the same prompt (a GRPO group's G samples, `data collect`'s M
    continuations of a state) are prefilled once; the KV cache rows and last logits are copied
    to the others. `lean_decode`: decode steps run without the attention mask when no row is
    padded (a query at the end sees every key) and, with TP = 1, outside the CPU compatibility
    layer's device mode (a decode step allocates nothing then; the mode costs a Python call
    per op).
    `fused_decode` (on by default, where `inference.fused.unsupported` is empty: TP = PP = 1,
    the local layer spec): the slot engine's decode steps (continuous batching, and
    `slot_cache`) run as one function over the model's weights instead of Megatron's module
    stack (`inference.fused`); prefill stays Megatron's forward.
    And on a GPU, `cuda_graphs` (off by default; PP = 1): the continuous engine's decode steps
    replay CUDA graphs (`inference.graphs`; run on one H200, TP = 1); they take precedence over
    `fused_decode`."""

    def __init__(self, model, tokenizer, *, max_sequence_length: int, pad_id: int = 0,
                 shared_prefill: bool = True, lean_decode: bool = True,
                 slot_cache: bool = False, cuda_graphs: bool = False,
                 fused_decode: bool = True):
        from megatron.core import parallel_state

        from megatron_foresight.inference import fused
        from megatron_foresight.inference.slots import SlotSelfAttention, unsupported_by_slots

        ps = parallel_state
        if (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
            raise UsageError("generation runs one model chunk per pipeline stage: set "
                             "parallel.virtual_pipeline_model_parallel_size=null (checkpoints "
                             "load at any TP/PP)")
        self.pipelined = ps.get_pipeline_model_parallel_world_size() > 1
        # A device draw's cumulative sum is not bitwise reproducible on CUDA, so TP ranks take
        # TP rank 0's tokens rather than trusting theirs to agree (`_draw`)
        self.tp_src = (ps.get_tensor_model_parallel_group(),
                       ps.get_tensor_model_parallel_src_rank()) \
            if ps.get_tensor_model_parallel_world_size() > 1 else None
        if self.pipelined:
            self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
            self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()
            self.pp_group = ps.get_pipeline_model_parallel_group()
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.pad_id = pad_id
        self.shared_prefill = shared_prefill
        self.lean_decode = lean_decode
        # Megatron's tensor-parallel gathers allocate on `torch.cuda.current_device()`, which
        # only the compatibility mode maps to the CPU: with TP > 1 decode keeps the mode.
        self.mode_off = lean_decode and ps.get_tensor_model_parallel_world_size() == 1
        self.stats = DecodeStats()
        if cuda_graphs and self.device.type != "cuda":
            raise UsageError(f"CUDA graphs of the decode step need a GPU; this model is on "
                             f"{self.device.type} (fc_rl.cuda_graphs: false to roll out here)")
        self.cuda_graphs = cuda_graphs
        inner = getattr(model, "module", model)
        slots = any(isinstance(m, SlotSelfAttention) for m in model.modules()) and \
            not unsupported_by_slots(inner.config)
        # Transformer Engine's core attention takes the mask type Megatron gives it (causal,
        # or none while decoding) and ignores the explicit mask that hides the static path's
        # left padding: a TE model decodes on the slot cache, which masks each row itself.
        self.te_attention = _te_core_attention(model)
        self.slot_cache = slots and (slot_cache or self.te_attention)
        self.fused_decode = fused_decode and not cuda_graphs and not fused.unsupported(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, tokens_BS, positions_BS, hide_BQT, context):
        """The last position's logits [B, V]; None on a pipeline stage before the last."""
        if self.pipelined and not self.first:
            self.model.set_input_tensor(self._receive())
        hide = None if hide_BQT is None else hide_BQT[:, None]  # [B, 1 (heads), Q, T]
        out = self.model(tokens_BS, positions_BS, hide,
                         inference_context=context, runtime_gather_output=True)
        if self.pipelined and not self.last:
            self._send(out)  # hidden states [S, B, H]
            return None
        logits_BV = out[:, -1]
        # The embedding is padded past the tokenizer's vocabulary; those ids mean nothing.
        logits_BV[:, self.tokenizer.vocab_size:] = float("-inf")
        return logits_BV

    def _send(self, hidden: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.send(torch.tensor(hidden.shape, dtype=torch.long, device=hidden.device),
                  self.next_rank)
        dist.send(hidden.contiguous(), self.next_rank)

    def _receive(self) -> torch.Tensor:
        import torch.distributed as dist

        shape = torch.empty(3, dtype=torch.long, device=self.device)
        dist.recv(shape, self.prev_rank)
        config = self.model.config
        hidden = torch.empty(shape.tolist(), dtype=config.pipeline_dtype or config.params_dtype,
                             device=self.device)
        dist.recv(hidden, self.prev_rank)
        return hidden

    def _next_tokens(self, logits_BV, rows: int, sampling: Sampling, gen):
        """Each row's next token and its log-probability, the same on every rank: drawn on the
        last pipeline stage, broadcast to the others."""
        if not self.pipelined:
            return _draw(logits_BV, sampling, gen, self.tp_src)
        import torch.distributed as dist

        if self.last:
            ids_B, logp_B = _draw(logits_BV, sampling, gen, self.tp_src)
        else:
            ids_B = torch.empty(rows, dtype=torch.long, device=self.device)
            logp_B = torch.empty(rows, dtype=torch.float32, device=self.device)
        dist.broadcast(ids_B, self.last_rank, group=self.pp_group)
        dist.broadcast(logp_B, self.last_rank, group=self.pp_group)
        return ids_B, logp_B

    def stop_condition(self, stop_texts: tuple[str, ...]):
        """Stop tokens for the stop strings that are one token in this tokenizer (the tags of
        the built-in world's tokenizer), and the strings that need a look at the decoded tail.

        In a BPE vocabulary a tag is several tokens, and its last one may carry more text
        (SmolLM2's "></" after "</search"): the completion then ends with that token as
        sampled, never cut or re-tokenized (the ids trained on are the ids sampled), and the
        environment reads the action up to its closing tag (`parse_action`); text after it is
        the model's own, which the strict format check counts unless it is whitespace."""
        ids, texts = set(), []
        for text in stop_texts:
            encoded = self.tokenizer.encode(text)
            if len(encoded) == 1:
                ids.add(encoded[0])
            else:
                texts.append(text)
        return frozenset(ids), tuple(texts)

    def _ends_with_stop_text(self, ids: list[int], texts: tuple[str, ...]) -> bool:
        """Whether the decoded tail holds one of `texts`: each token of a tag spells at least
        one of its characters, so the last len(text) tokens hold a tag completed by the last
        token, whatever that token merged with (two more: margin)."""
        if not texts:
            return False
        tail = self.tokenizer.decode(ids[-max(len(t) for t in texts) - 2:])
        return any(t in tail for t in texts)

    def _ends(self, c: Completion, limit: int, sampling: Sampling, stop_ids, stop_tail) -> bool:
        """Whether the token just appended to `c` ends it (and why, in `c.stop`); `limit` is the
        row's room for new tokens."""
        tok = c.ids[-1]
        if tok == self.tokenizer.eod:
            c.stop = "eos"
        elif tok in stop_ids or self._ends_with_stop_text(c.ids, stop_tail):
            c.stop = "stop"
        elif len(c.ids) >= limit:
            c.stop = "length" if limit == sampling.max_new_tokens else "context"
        else:
            return False
        return True

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 stop_texts: tuple[str, ...] = (),
                 row_seeds: list[int] | None = None) -> list[Completion]:
        """Continue each prompt (token ids) until a stop string is generated (it ends the
        completion, included), max_new_tokens, or the sequence limit. `row_seeds`: row b
        draws from its own generator seeded with row_seeds[b] (instead of one seeded with
        sampling.seed for the batch)."""
        if self.slot_cache:
            from megatron_foresight.inference import continuous

            return continuous.generate(self, prompts, sampling, stop_texts, row_seeds)
        with self.for_decoding():
            return self._generate(prompts, sampling, stop_texts, row_seeds)

    @contextlib.contextmanager
    def for_decoding(self):
        """The model as decoding runs it: without sequence parallelism (a decode step's one
        token per row cannot be split over the TP ranks) and without FP8 (Transformer Engine's
        FP8 GEMMs need row counts that are multiples of 8 or 16, and a decode batch is B rows
        that shrink as rows finish: its matmuls run in the weights' own bf16). Both are
        flags Megatron reads on each forward. The FP8 half was not run on a GPU."""
        inner = getattr(self.model, "module", self.model)
        sequence_parallel = inner.config.sequence_parallel
        fp8 = {id(m.config): (m.config, m.config.fp8) for m in inner.modules()
               if getattr(getattr(m, "config", None), "fp8", None)}
        if sequence_parallel:
            from megatron.core.transformer.utils import set_model_to_sequence_parallel

            set_model_to_sequence_parallel(inner, False)
        for config, _ in fp8.values():
            config.fp8 = None
        try:
            yield
        finally:
            for config, recipe in fp8.values():
                config.fp8 = recipe
            if sequence_parallel:
                set_model_to_sequence_parallel(inner, True)

    def _generate(self, prompts, sampling, stop_texts, row_seeds) -> list[Completion]:
        from megatron.core.inference.contexts import StaticInferenceContext

        stop_ids, stop_tail = self.stop_condition(stop_texts)
        out = [Completion() for _ in prompts]
        live = [i for i, p in enumerate(prompts) if len(p) < self.max_sequence_length]
        for i in set(range(len(prompts))) - set(live):
            out[i].stop = "context"
        if not live:
            return out
        rows = [prompts[i] for i in live]
        B, L = len(rows), max(len(p) for p in rows)
        if self.te_attention and any(len(p) != L for p in rows):
            from megatron_foresight.inference.slots import unsupported_by_slots

            inner = getattr(self.model, "module", self.model)
            raise UsageError(
                "prompts of unequal lengths in one batch: this model's Transformer Engine "
                "attention would not hide their padding, and the slot cache that masks it "
                f"cannot run this model ({', '.join(unsupported_by_slots(inner.config))}); "
                "generate with batch size 1")
        new = min(sampling.max_new_tokens, self.max_sequence_length - min(len(p) for p in rows))
        dev = self.device
        tokens_BL = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        pad_BT = torch.ones(B, L + new, dtype=torch.bool, device=dev)
        for b, p in enumerate(rows):
            tokens_BL[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            pad_BT[b, L - len(p):] = False
        positions_BL = (~pad_BT[:, :L]).long().cumsum(-1).sub(1).clamp(min=0)
        # Megatron's masks mark what to hide: the future, and padded keys (a padded query may
        # see itself, so no softmax row is empty).
        future_LL = torch.ones(L, L, dtype=torch.bool, device=dev).triu(1)
        hide_BLL = future_LL | pad_BT[:, None, :L]
        hide_BLL &= ~torch.eye(L, dtype=torch.bool, device=dev)
        context = StaticInferenceContext(B, L + new)
        firsts, source = _distinct(rows) if self.shared_prefill else (list(range(B)), None)
        if source is None:
            logits_BV = self._forward(tokens_BL, positions_BL, hide_BLL, context)
        else:
            index = torch.tensor(firsts, device=dev)
            logits_UV = self._forward(tokens_BL[index], positions_BL[index], hide_BLL[index],
                                      context)
            # cache row b := the prefilled row of b's prompt (rows past U were never written)
            context.swap_key_value_dict(source)
            logits_BV = None if logits_UV is None else logits_UV[torch.tensor(source,
                                                                              device=dev)]
        context.sequence_len_offset = L
        if row_seeds is None:
            gen = torch.Generator().manual_seed(sampling.seed)
        else:
            gen = [torch.Generator().manual_seed(row_seeds[i]) for i in live]
        limit = [min(new, self.max_sequence_length - len(p)) for p in rows]
        positions_B = positions_BL[:, -1]
        rows_now = list(range(B))  # the batch rows still decoding, in the cache's row order
        padded = bool(pad_BT.any())
        for t in range(new):
            ids_B, logp_B = self._next_tokens(logits_BV, len(rows_now), sampling, gen)
            keep = []
            for j, (tok, lp) in enumerate(zip(ids_B.tolist(), logp_B.tolist())):
                b = rows_now[j]
                c = out[live[b]]
                c.ids.append(tok)
                c.logprobs.append(lp)
                if not self._ends(c, limit[b], sampling, stop_ids, stop_tail):
                    keep.append(j)
            if not keep or t == new - 1:
                break
            if len(keep) < len(rows_now):
                # Finished rows leave the batch: their cache rows move behind the live ones
                # (Megatron's static context reads rows [0, B') of its memory).
                gone = [j for j in range(B) if j not in keep]
                context.swap_key_value_dict(keep + gone)
                rows_now = [rows_now[j] for j in keep]
                if row_seeds is not None:
                    gen = [gen[j] for j in keep]
                index = torch.tensor(keep, device=dev)
                ids_B, positions_B, pad_BT = ids_B[index], positions_B[index], pad_BT[index]
                padded = bool(pad_BT.any())
            positions_B = positions_B + 1
            hide_B1T = pad_BT[:, None, :L + t + 1] if padded or not self.lean_decode else None
            with device_mode_off() if self.mode_off else contextlib.nullcontext():
                logits_BV = self._forward(ids_B[:, None], positions_B[:, None], hide_B1T,
                                          context)
            self.stats.add(len(rows_now))
            context.sequence_len_offset += 1
        return out
