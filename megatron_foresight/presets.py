"""Model shapes by name. A recipe's `model.preset` starts from one of these; keys the recipe sets
itself win. Shapes follow the published configs of each family."""

from __future__ import annotations

_LLAMA = dict(
    family="llama", normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu",
    add_qkv_bias=False, position_embedding_type="rope",
)
_QWEN2 = dict(_LLAMA, family="qwen2", add_qkv_bias=True, norm_epsilon=1e-6, rotary_base=1_000_000)

PRESETS: dict[str, dict] = {
    # Trains on a laptop CPU in minutes: 4 layers, GQA 8/2, ~1M non-embedding parameters.
    "tiny": dict(_LLAMA, num_layers=4, hidden_size=256, ffn_hidden_size=704,
                 num_attention_heads=8, num_query_groups=2, max_position_embeddings=1024,
                 rotary_base=10_000, untie_embeddings_and_output_weights=True),
    "tiny-qwen2": dict(_QWEN2, num_layers=4, hidden_size=256, ffn_hidden_size=704,
                       num_attention_heads=8, num_query_groups=2, max_position_embeddings=1024,
                       untie_embeddings_and_output_weights=True),
    # SmolLM2-135M (`tools/build_smollm2.py`): Llama-shaped, 9 query heads over 3 KV heads
    # (TP 1, 3 or 9), tied embeddings, a 49152-token BPE vocabulary.
    "smollm2-135m": dict(_LLAMA, num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                         num_attention_heads=9, num_query_groups=3, vocab_size=49_152,
                         max_position_embeddings=8192, rotary_base=100_000,
                         untie_embeddings_and_output_weights=False),
    # Llama 3.2 1B: tied embeddings, llama3 RoPE scaling with factor 32.
    "llama3-1b": dict(_LLAMA, num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                      num_attention_heads=32, num_query_groups=8, vocab_size=128_256,
                      max_position_embeddings=131_072, rotary_base=500_000, rope_scaling=True,
                      rope_scaling_factor=32.0, untie_embeddings_and_output_weights=False),
    "llama3-8b": dict(_LLAMA, num_layers=32, hidden_size=4096, ffn_hidden_size=14_336,
                      num_attention_heads=32, num_query_groups=8, vocab_size=128_256,
                      max_position_embeddings=131_072, rotary_base=500_000, rope_scaling=True,
                      rope_scaling_factor=8.0, untie_embeddings_and_output_weights=True),
    "llama3-70b": dict(_LLAMA, num_layers=80, hidden_size=8192, ffn_hidden_size=28_672,
                       num_attention_heads=64, num_query_groups=8, vocab_size=128_256,
                       max_position_embeddings=131_072, rotary_base=500_000, rope_scaling=True,
                       rope_scaling_factor=8.0, untie_embeddings_and_output_weights=True),
    "qwen2.5-7b": dict(_QWEN2, num_layers=28, hidden_size=3584, ffn_hidden_size=18_944,
                       num_attention_heads=28, num_query_groups=4, vocab_size=152_064,
                       max_position_embeddings=32_768, untie_embeddings_and_output_weights=True),
}
