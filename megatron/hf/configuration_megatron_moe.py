"""transformers configuration of a megatron-moe GPT (self-contained: copied into every MoE export).

A pre-LayerNorm GPT with learned positions and a tied output embedding, where some layers' MLPs are
DeepSpeed-style mixture-of-experts layers: ``experts_per_layer[i] > 1`` marks layer i as MoE.
"""
from transformers import PretrainedConfig


class MegatronMoEConfig(PretrainedConfig):
    model_type = "megatron_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256,
                 max_position_embeddings=128, layernorm_epsilon=1e-5, experts_per_layer=None, mlp_type="standard",
                 topk=1, router_type="topk", initializer_range=0.02, use_cache=True, tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers  # the name generic HF code reads
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layernorm_epsilon = layernorm_epsilon
        self.experts_per_layer = list(experts_per_layer or [1] * num_layers)
        self.mlp_type = mlp_type  # "standard" or "residual" (Residual-MoE: a dense MLP mixed with the experts)
        self.topk = topk
        # the routing of modeling_megatron_moe.Router: "topk", or "aux_free" (a selection-only expert bias); the
        # exporter writes the trained router class's hf_router_type
        self.router_type = router_type
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
