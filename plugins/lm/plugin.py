"""The plain language-model stage: the framework's blended next-token loss with its defaults
(the generated corpus, every token weighted 1)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_foresight.training.blend import BlendConfig, BlendStage


@dataclass
class Config(BlendConfig):
    """Plain language modelling on a blend of text corpora (and rendered trajectories)."""


class LanguageModelStage(BlendStage):
    Config = Config


STAGE = LanguageModelStage
