"""FE-SFT (format-eliciting SFT) as a stage plugin. Recipe section:

    stage: fe_sft
    checkpoint: {init_from: runs/wm_amt}        # start from the WM-AMT checkpoint
    fe_sft:
      sources: [foresight:world:train, world:train]   # hindsight traces, format-free traces
      weights: [0.85, 0.15]
      segment_weights: {think: 1, plan: 1, rollout: 1, value: 1, action: 1}
"""

from plugins.fe_sft.plugin import STAGE, Config

__all__ = ["STAGE", "Config"]
