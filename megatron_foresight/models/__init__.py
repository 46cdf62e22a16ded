"""Model providers: Megatron-Core GPTModel from the recipe's model section (provider.py), and
named model shapes (megatron_foresight/presets.py)."""
