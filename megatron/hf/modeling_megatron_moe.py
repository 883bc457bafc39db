"""transformers model of a megatron-moe GPT (self-contained: copied into every MoE export).

Module names equal megatron-moe's own, so the exported safetensors hold the training parameter names.
Routing is evaluation routing with no token dropped: each token goes to its top-k experts by softmax
probability; top-1 scales the expert output by that probability, top-2 renormalises the two weights.

Shapes: B batch, T new tokens, P past tokens, H hidden, nh heads, hd head dim, E experts, S = B*T tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_moe import MegatronMoEConfig


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask, cache):
        # x: [B, T, H]; mask: [B, 1, T, P + T] bool; cache: transformers Cache or None
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, nh, T, hd]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, nh, P + T, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DenseMLPBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = MLP(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x):
        return self.mlp(x)


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, router_type: str = "topk"):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        if router_type == "aux_free":  # auxiliary-loss-free balancing: a per-expert bias for the choice only
            self.expert_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)  # [E]

    def choose(self, probs):
        # probs: [S, E] -> expert indices [S, k'] ranked by the (biased) score; weights stay the unbiased probs
        bias = getattr(self, "expert_bias", None)
        return probs if bias is None else probs + bias.float()


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))  # [E, H, F]
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn_hidden_size))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))  # [E, F, H]
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size))  # [E, H]

    def expert(self, e: int, x):
        # x: [n, H] -> [n, H] through expert e
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]


class MoELayer(nn.Module):
    def __init__(self, config, num_experts: int):
        super().__init__()
        self.num_experts, self.topk = num_experts, config.topk
        self.router = Router(config.hidden_size, num_experts, getattr(config, "router_type", "topk"))
        self.experts = StackedExperts(num_experts, config.hidden_size, config.ffn_hidden_size)
        self.residual = config.mlp_type == "residual"
        if self.residual:
            self.residual_mlp = MLP(config.hidden_size, config.ffn_hidden_size)
            self.coefficient = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden):
        B, T, H = hidden.shape
        x = hidden.reshape(B * T, H)  # [S, H]
        probs = torch.softmax(F.linear(x.float(), self.router.wg.weight.float()), dim=-1)  # [S, E] fp32
        indices = torch.topk(self.router.choose(probs), self.topk, dim=-1).indices  # [S, k]
        weights = probs.gather(1, indices)  # [S, k]
        if self.topk > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
        y = torch.zeros(B * T, H, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            token, choice = torch.nonzero(indices == e, as_tuple=True)  # tokens sent to expert e
            if token.numel():
                out = self.experts.expert(e, x.index_select(0, token)).float()  # [n, H]
                y.index_add_(0, token, out * weights[token, choice][:, None])
        if self.residual:
            coef = torch.softmax(self.coefficient(x).float(), dim=-1)  # [S, 2]
            y = y * coef[:, 0:1] + self.residual_mlp(x).float() * coef[:, 1:2]
        return y.to(hidden.dtype).view(B, T, H)


class TransformerLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        experts = config.experts_per_layer[layer_idx]
        self.mlp = MoELayer(config, experts) if experts > 1 else DenseMLPBlock(config)

    def forward(self, x, mask, cache):
        x = x + self.attention(self.input_layernorm(x), mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MegatronMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegatronMoEConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_cache_class = True
    _no_split_modules = ["TransformerLayer"]

    def __init__(self, config: MegatronMoEConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, StackedExperts):
            module.w1.data.normal_(0.0, std)
            module.w2.data.normal_(0.0, std)
            module.b1.data.zero_()
            module.b2.data.zero_()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                labels=None, use_cache=None, cache_position=None, logits_to_keep=0, return_dict=None, **kwargs):
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None:  # transformers >= 5 passes the cache as ``cache``
            past_key_values = kwargs.pop("cache", None)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None, :].expand(B, T)
        h = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [B, T, H]
        qpos = torch.arange(past, past + T, device=device)[:, None]  # [T, 1]
        kpos = torch.arange(past + T, device=device)[None, :]  # [1, P + T]
        mask = (kpos <= qpos)[None, None]  # [1, 1, T, P + T] causal
        if attention_mask is not None:
            valid = attention_mask[:, -(past + T):].bool()  # [B, P + T]
            mask = mask & (valid[:, None, None, :] | (kpos == qpos)[None, None])  # padded keys out; a query sees itself
        for layer in self.layers:
            h = layer(h, mask, past_key_values if use_cache else None)
        h = self.final_layernorm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.word_embeddings.weight)  # [B, T, V] tied output embedding
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
