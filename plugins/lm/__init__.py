"""Plain language modelling: next-token loss on a blend of text corpora and preprocessed
datasets (e.g. rendered trajectories), every token or weighted by segment type.

The simplest stage the framework runs, and the replay half of WM-AMT's blend. Recipe section:

    stage: lm
    lm:
      sources: [builtin, data/my_corpus.jsonl]   # .jsonl with a "text" field, .txt one doc per line
      weights: [0.3, 0.7]                          # blend weights (default: equal)

    lm:
      sources: [data/idx/traj, builtin]   # from `foresight data preprocess --output-prefix ...`
      weights: [0.7, 0.3]
      segment_weights: {action: 1.0, observation: 1.0, text: 1.0}   # prompts weigh 0
"""

from plugins.lm.plugin import STAGE, Config

__all__ = ["STAGE", "Config"]
