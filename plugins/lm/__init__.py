"""Plain language modelling: next-token loss on every token of a blend of text corpora.

The simplest stage the framework runs, and the replay half of WM-AMT's blend. Recipe section:

    stage: lm
    lm:
      sources: [builtin, data/my_corpus.jsonl]   # .jsonl with a "text" field, .txt one doc per line
      weights: [0.3, 0.7]                          # blend weights (default: equal)
"""

from plugins.lm.plugin import PLUGIN, Config

__all__ = ["PLUGIN", "Config"]
