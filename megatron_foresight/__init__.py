"""megatron-foresight: train LLM agents to plan with an internal world model, on Megatron-Core."""

__version__ = "0.1.0"
