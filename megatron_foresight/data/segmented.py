"""Reading preprocessed trajectories for training: Megatron's `GPTDataset` (its document,
sample and shuffle indices, its blending) over the token stream, plus the segment type of every
label token from the parallel `_segments` stream, so a stage weights its loss by segment."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_foresight.data.preprocess import SEGMENTS_SUFFIX
from megatron_foresight.data.render import Seg
from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class SegmentedDatasetConfig(GPTDatasetConfig):
    """Megatron's `GPTDatasetConfig` and what our datasets add to it."""

    document_starts: bool = False
    """Each sample carries `document_starts` ([seq] bool, True where a document begins: the
    first token and every token after an EOD, the rule of Megatron's reset attention mask)."""


class _SegmentView:
    """The dataset as GPTDataset's sample query sees it, reading the segment stream: the same
    indices select the same spans of both streams, and padding is `Seg.PAD`."""

    def __init__(self, parent: GPTDataset, segments: IndexedDataset):
        self._parent, self.dataset, self._pad_token_id = parent, segments, int(Seg.PAD)

    def __getattr__(self, name):
        return getattr(self._parent, name)


class SegmentedGPTDataset(GPTDataset):
    """Samples with a `segments` tensor beside `labels`: the segment type of each label.

    GPTDataset cuts samples from the stream of documents without regard to their bounds, so a
    sample usually begins inside a document whose beginning is in another sample. With
    `mask_cut_start` the labels of that document's part get no loss (`loss_mask` 0): for agent
    trajectories its turns would be learnt without the task they answer."""

    mask_cut_start = False

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)
        prefix = indexed_dataset.path_prefix + SEGMENTS_SUFFIX
        try:
            segments = IndexedDataset(prefix, mmap=config.mmap_bin_files)
        except FileNotFoundError:
            raise UsageError(f"{prefix}.idx not found: {indexed_dataset.path_prefix} was not "
                             "written by `foresight data preprocess`") from None
        if not np.array_equal(segments.sequence_lengths, indexed_dataset.sequence_lengths):
            raise UsageError(f"{prefix} does not match {indexed_dataset.path_prefix} (different "
                             "documents); preprocess them again")
        self._segment_view = _SegmentView(self, segments)
        # GPTDataset caches the first sample's loss mask after zeroing its padding in place, so
        # every later sample would lose the loss where the first one was padded (Megatron-LM
        # issues #1269 and #1711, still so in megatron-core 0.16.1): no cache here
        self.masks_and_position_ids_are_cacheable = False

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        segments, _ = GPTDataset._query_document_sample_shuffle_indices(
            self._segment_view, 0 if idx is None else idx)
        segments = torch.from_numpy(segments)
        segments = segments[1:] if self.config.add_extra_token_to_sequence else segments
        item["segments"] = torch.zeros_like(segments) if idx is None else segments
        if getattr(self.config, "document_starts", False):
            tokens = item["tokens"]
            starts = torch.ones_like(tokens, dtype=torch.bool)
            # padding (token 0) after a sample's last EOD is a document of its own, as in the
            # reset mask; an EOD id of 0 would make each padding token one (correct, longer)
            starts[1:] = tokens[:-1] == self.config.tokenizer.eod
            item["document_starts"] = starts
        if self.mask_cut_start and idx is not None:
            cut = self.cut_start_tokens(idx)
            if cut > 1:  # label j is the sample's token j + 1
                item["loss_mask"] = item["loss_mask"].clone()  # GPTDataset may cache it
                item["loss_mask"][:cut - 1] = 0.0
        return item

    def cut_start_tokens(self, idx: int) -> int:
        """How many of sample `idx`'s first tokens belong to a document that began before it
        (0 when the sample starts at a document's first token)."""
        first, offset = self.sample_index[self.shuffle_index[idx]]
        if not offset:
            return 0
        return int(self.dataset.sequence_lengths[self.document_index[first]]) - int(offset)


class CutStartMaskedGPTDataset(SegmentedGPTDataset):
    """`SegmentedGPTDataset` with no loss on a document cut at the sample's start."""

    mask_cut_start = True


def pack_documents(lengths: np.ndarray, documents: np.ndarray, seq_length: int,
                   window: int = 64) -> tuple[list[int], list[tuple[int, int]], int]:
    """Samples of whole documents for Megatron's sample query: the documents reordered a little
    (`order`), where each sample starts (`starts`: position in `order` and token offset, one
    row per sample and a last row one past the end), and the padding tokens.

    A sample takes the next document, then the largest of the next `window` unplaced documents
    that still fits, until none does; the rest of its `seq_length` tokens is padding. A
    document longer than a sample fills samples of its own, and its last part starts a sample
    that others join. Every document is placed once. The last row is `(len(order), 0)`: the
    last sample's final label is the token after it, which the caller provides (the next
    epoch's first document) or replaces (`end_packing`)."""
    pending: list[int | None] = [int(d) for d in documents]
    order: list[int] = []
    starts = [(0, 0)]
    padding = 0
    head = 0  # pending[:head] are placed
    while head < len(pending):
        doc = pending[head]
        head += 1
        order.append(doc)
        size = int(lengths[doc])
        offset = 0
        while size - offset > seq_length:  # a whole sample of a long document
            offset += seq_length
            starts.append((len(order) - 1, offset))
        used = size - offset
        while used < seq_length:  # the largest of the next `window` unplaced that fits
            best, seen, k = None, 0, head
            while k < len(pending) and seen < window:
                d = pending[k]
                if d is not None:
                    seen += 1
                    if lengths[d] <= seq_length - used and (
                            best is None or lengths[d] > lengths[pending[best]]):
                        best = k
                k += 1
            if best is None:
                break
            order.append(pending[best])
            used += int(lengths[pending[best]])
            pending[best] = None
        while head < len(pending) and pending[head] is None:
            head += 1
        padding += seq_length - used
        starts.append((len(order), 0))
    return order, starts, padding


def end_packing(order: list[int], starts: list[tuple[int, int]], lengths) -> None:
    """Make the last row of `pack_documents`' starts end the last sample on its own last token
    (nothing follows it): the last label is the last document's end-of-document."""
    if order:
        starts[-1] = (len(order) - 1, int(lengths[order[-1]]) - 1)


class PackedGPTDataset(SegmentedGPTDataset):
    """Samples made of whole documents (`pack_documents`), padded to the sequence length
    (padding has no loss), where GPTDataset cuts them from the stream regardless of bounds. A
    document longer than a sample is still cut (`PackedCutStartMaskedGPTDataset` gives its parts
    after the first no loss). For agent trajectories no turn is learnt without its task, and no
    loss is thrown away to get there (with plain cutting and `mask_cut_start`, the masked cut
    parts were 35% of FE-SFT's agent tokens in the tiny recipe).

    Epochs: each is the split's documents in an order shuffled with the dataset's seed, packed
    on its own; epochs are added until there are enough samples. The samples are shuffled
    within their epoch and the epochs follow each other, so every document is seen once before
    any is seen twice. The index is built on load, not cached: ~1 s per 100,000 documents
    (padding ~5% for lengths around half a sample, 14% for FE-SFT's foresight traces)."""

    def _build_document_sample_shuffle_indices(self):
        """The packed indices, in place of GPTDataset's (which would be built and cached on
        disk only to go unused)."""
        if not self.config.add_extra_token_to_sequence:
            raise UsageError("packing documents needs add_extra_token_to_sequence (Megatron's "
                             "default)")
        lengths = self.dataset.sequence_lengths
        rng = np.random.RandomState(self.config.random_seed)
        order: list[int] = []
        starts = [(0, 0)]
        epochs = [0]  # where each epoch's samples begin
        padding = 0
        while len(starts) - 1 < max(self.num_samples or 0, 1):
            more, rows, pad = pack_documents(lengths, rng.permutation(self.indices),
                                             self.config.sequence_length)
            if not more:
                break
            starts += [(len(order) + i, o) for i, o in rows[1:]]
            order += more
            padding += pad
            epochs.append(len(starts) - 1)
        end_packing(order, starts, lengths)
        shuffle = np.concatenate(
            [a + rng.permutation(b - a) for a, b in zip(epochs, epochs[1:])] or [[]])
        samples = len(starts) - 1
        log.info("%s (%s): %d samples of whole documents in %d epoch(s), %.1f%% of their "
                 "tokens padding", self.dataset.path_prefix, self.index_split.name, samples,
                 len(epochs) - 1, 100 * padding / max(1, samples * self.config.sequence_length))
        return (np.array(order, dtype=np.int32), np.array(starts, dtype=np.int64),
                shuffle.astype(np.int64))


class PackedCutStartMaskedGPTDataset(PackedGPTDataset):
    """`PackedGPTDataset` with no loss on the parts after the first of a document longer than
    a sample."""

    mask_cut_start = True


def segment_weight_table(weights: dict[str, float]) -> torch.Tensor:
    """Loss weight by segment type id, from `weights` by type name (e.g. {"observation": 1.0,
    "action": 0.2}; types not named weigh 0). Index it with a batch's `segments`."""
    table = torch.zeros(len(Seg))
    for name, w in weights.items():
        table[Seg[name.upper()]] = w
    return table


def dataset_class(pack: bool, mask_cut: bool) -> type[SegmentedGPTDataset]:
    """The dataset class a blend stage's `pack_documents` and `mask_cut_documents` ask for."""
    return {(False, False): SegmentedGPTDataset, (False, True): CutStartMaskedGPTDataset,
            (True, False): PackedGPTDataset,
            (True, True): PackedCutStartMaskedGPTDataset}[pack, mask_cut]
