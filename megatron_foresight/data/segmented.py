"""Reading preprocessed trajectories for training: Megatron's `GPTDataset` (its document,
sample and shuffle indices, its blending) over the token stream, plus the segment type of every
label token from the parallel `_segments` stream, so a stage weights its loss by segment."""

from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_foresight.data.preprocess import SEGMENTS_SUFFIX
from megatron_foresight.data.render import Seg
from megatron_foresight.errors import UsageError


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

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        segments, _ = GPTDataset._query_document_sample_shuffle_indices(
            self._segment_view, 0 if idx is None else idx)
        segments = torch.from_numpy(segments)
        segments = segments[1:] if self.config.add_extra_token_to_sequence else segments
        item["segments"] = torch.zeros_like(segments) if idx is None else segments
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


def segment_weight_table(weights: dict[str, float]) -> torch.Tensor:
    """Loss weight by segment type id, from `weights` by type name (e.g. {"observation": 1.0,
    "action": 0.2}; types not named weigh 0). Index it with a batch's `segments`."""
    table = torch.zeros(len(Seg))
    for name, w in weights.items():
        table[Seg[name.upper()]] = w
    return table
