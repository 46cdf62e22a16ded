"""Which samples each rank reads at each step, and the loaders that read them.

Sample order is a pure function of the step: at step t, microbatch m, data-parallel rank r
reads samples  t*G + m*(M*D) + r*M + [0, M)  (G global batch, M micro batch, D data-parallel
size), as Megatron's pretraining sampler does. So resuming at step k needs only k, a different
data-parallel size sees the same global batches, and no sampler state is saved."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class StepSampler(Sampler):
    """Yields this rank's index lists, one per microbatch, from `start_step` on; wraps around
    the dataset (for validation, which re-reads the same batches at every evaluation)."""

    def __init__(self, dataset_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, start_step: int = 0, num_steps: int | None = None):
        if dataset_len < global_batch:
            raise ValueError(f"dataset has {dataset_len} samples, fewer than one global batch "
                             f"({global_batch}); add data or lower schedule.global_batch_size")
        self.n, self.g, self.m = dataset_len, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.start, self.num_steps = start_step, num_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        micro_per_step = self.g // (self.m * self.dp_size)
        while self.num_steps is None or step < self.start + self.num_steps:
            for micro in range(micro_per_step):
                first = step * self.g + micro * self.m * self.dp_size + self.dp_rank * self.m
                yield [(first + j) % self.n for j in range(self.m)]
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an open-ended sampler has no length")
        return self.num_steps * (self.g // (self.m * self.dp_size))


HOST_KEYS = frozenset({"max_seqlen"})
"""Batch entries that stay on the host: Megatron reads them as Python numbers."""


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Samples stacked into a microbatch, [micro_batch, seq] each. Samples that carry
    `document_starts` (data.document_masks on Transformer Engine) become one packed row
    instead, [1, micro_batch * seq], with its documents' boundaries (`document_boundaries`)."""
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]
             if samples[0][k] is not None}
    starts = batch.pop("document_starts", None)
    if starts is None:
        return batch
    if any(v.shape != starts.shape for v in batch.values()):
        raise ValueError("packing a microbatch into one row needs per-token entries only, got "
                         + ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items()))
    return {**{k: v.reshape(1, -1) for k, v in batch.items()}, **document_boundaries(starts)}


def document_boundaries(starts_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """The packed-sequence (THD) boundaries of a microbatch whose rows, laid end to end, are
    one sequence, from `starts_BS` [rows, seq] (True where a document begins; a row's first
    token always does): `cu_seqlens` (int32 [documents + 1]: where each begins, then rows x
    seq) and `max_seqlen` (a 0-d int64 kept on the host: the longest document rounded up to a
    multiple of 64, at most seq, as TE rounds it when it derives it itself, so its kernels
    see a few lengths, not one per batch). Built in the loader's workers, so the training
    step reads no boundary back from the GPU."""
    starts = starts_BS.clone()
    starts[:, 0] = True
    seq = starts.size(1)
    cu = torch.cat([starts.flatten().nonzero().flatten(),
                    torch.tensor([starts.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seqlens": cu, "max_seqlen": torch.tensor(min(seq, -(-longest // 64) * 64))}


def packed_seq_params(batch: dict):
    """Megatron's `PackedSeqParams` (THD: every document of the row attends only to itself,
    with RoPE restarting at each) for a batch that `collate` gave `cu_seqlens`; else None."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on `device` (a module's device, or None to leave them where they are;
    tensors already there are not copied), but for the `HOST_KEYS`."""
    if device is None:
        return batch
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def loader(dataset, sampler: StepSampler, num_workers: int) -> Iterator[dict]:
    """Batches on this process's device."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    data = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=device is not None, persistent_workers=num_workers > 0)
    for batch in data:
        yield to_device(batch, device)
