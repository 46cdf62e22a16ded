"""WM-AMT (world-model agentic mid-training) as a stage plugin. Recipe section:

    stage: wm_amt
    data: {world: data/world, tokenizer: {type: sentencepiece}}
    wm_amt:
      sources: [world:train, builtin]
      weights: [0.75, 0.25]
      valid_sources: [world:validation]
      segment_weights: {observation: 1.0, outcome: 1.0, text: 1.0}
"""

from plugins.wm_amt.plugin import STAGE, Config

__all__ = ["STAGE", "Config"]
