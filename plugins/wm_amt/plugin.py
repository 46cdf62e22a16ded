"""WM-AMT, world-model agentic mid-training: the model learns to predict the environment.

Each trajectory is rendered as a world-model sample: the context (the task prompt, the history
and the agent's action) is read, the targets are the environment's next observation and, at the
end, the trajectory's outcome as a success / failure statement. Which segment types carry loss,
and how much, comes from the recipe (`wm_amt.segment_weights`); plain text is blended in as
replay so the model keeps its language. Validation on held-out trajectories logs the loss of
each weighted segment type and the next-observation token accuracy (`val/acc/observation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_foresight.data.render import Seg, Segment, register_renderer, transcript
from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.training.blend import BlendConfig, BlendStage

OUTCOME = {True: "Outcome: success\n", False: "Outcome: failure\n"}


@register_renderer("wm_amt")
def world_model_sample(trajectory: Trajectory) -> list[Segment]:
    """The transcript (prompt, agent turns, observations), then the outcome statement."""
    return transcript(trajectory) + [(OUTCOME[trajectory.outcome.success], Seg.OUTCOME)]


@dataclass
class Config(BlendConfig):
    """World-model agentic mid-training: predict observations and outcomes of trajectories,
    blended with plain text."""

    sources: list[str] = field(default_factory=lambda: ["world:train", "builtin"])
    """Datasets to blend: world:SPLIT (the built-in world's trajectories), paths to trajectory
    files or shards, builtin (the generated corpus, as replay), text files, or preprocessed
    dataset prefixes."""
    weights: Optional[list[float]] = field(default_factory=lambda: [0.75, 0.25])
    """Blend weights, one per source."""
    valid_sources: Optional[list[str]] = field(default_factory=lambda: ["world:validation"])
    """Held-out trajectories: the per-segment losses and next-observation accuracy."""
    renderer: str = "wm_amt"
    """How trajectories become segments (wm_amt: transcript + outcome statement)."""
    segment_weights: Optional[dict[str, float]] = field(default_factory=lambda: {
        "observation": 1.0, "outcome": 1.0, "text": 1.0})
    """Loss weight per segment type: observation and outcome are the world model's targets,
    text the replay; action (the agent's turns) and prompt (the context) may be added."""


class WorldModelStage(BlendStage):
    Config = Config
    eval_predictions = True


STAGE = WorldModelStage
