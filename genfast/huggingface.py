"""genfast inside Hugging Face transformers models: what genfast.optimize swaps in GPT-2 and
Llama models when transformers is installed. This module imports transformers.

- Attention: a model's attention layers call the function transformers' AttentionInterface
  holds under the config's attention implementation. genfast registers its
  scaled_dot_product_attention there as "genfast", with the masks transformers builds for
  "sdpa" (none at all where causality alone masks, so the kernel skips masked tiles).
- Norms: LlamaRMSNorm runs genfast's RMSNorm (GPT-2's torch.nn.LayerNorm is swapped as any).
- MLPs: LlamaMLP with SiLU runs gate and up through one SwiGLU pass; the GELU modules of
  transformers.activations (GPT-2's tanh form among them) run genfast's GELU.

Module swaps change a module's class to a subclass that overrides forward only, as
genfast.optimize does for torch.nn: parameters, hooks and state_dict stay.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel, activations
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama import modeling_llama

from . import ops

ATTENTION = "genfast"


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention function contract over genfast.ops.scaled_dot_product_attention:
    query (B, H, S_q, D), key and value (B, H_kv, S_k, D), attention_mask bool or additive
    (broadcastable to (B, H, S_q, S_k)) or None; returns (output (B, S_q, H, D), None), no
    attention weights, as transformers' "sdpa". Causality is decided as "sdpa" decides it.
    A T5-style position_bias goes to transformers' own "sdpa" function."""
    if kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    queries = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(queries > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > queries:
        # A prompt into a longer, empty static cache: keys past the queries are masked anyway.
        key, value = key[:, :, :queries], value[:, :, :queries]
    out = ops.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1], softcap=kwargs.get("softcap"),
    )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register_attention() -> None:
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class LlamaRMSNorm(modeling_llama.LlamaRMSNorm):
    def forward(self, hidden_states: Tensor) -> Tensor:
        return ops.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


class LlamaMLP(modeling_llama.LlamaMLP):
    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class NewGELUActivation(activations.NewGELUActivation):  # "gelu_new", GPT-2's
    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, approximate="tanh")


class GELUTanh(activations.GELUTanh):  # "gelu_pytorch_tanh"
    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, approximate="tanh")


class GELUActivation(activations.GELUActivation):  # "gelu"
    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input)


# transformers class -> genfast class
SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    modeling_llama.LlamaRMSNorm: LlamaRMSNorm,
    modeling_llama.LlamaMLP: LlamaMLP,
    activations.NewGELUActivation: NewGELUActivation,
    activations.GELUTanh: GELUTanh,
    activations.GELUActivation: GELUActivation,
}


def swap_class(module: nn.Module) -> type[nn.Module] | None:
    """The genfast class for a module of exactly a class in SWAPS, where it computes the same."""
    if type(module) is modeling_llama.LlamaMLP and module.config.hidden_act != "silu":
        return None
    return SWAPS.get(type(module))


def use_genfast_attention(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Switch every transformers model within model (model included) to genfast's attention;
    returns {qualified name: class} of the attention layers this call switched."""
    switched = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config._attn_implementation != ATTENTION]
    if not switched:
        return {}
    register_attention()
    for pretrained in switched:
        pretrained.set_attn_implementation(ATTENTION)
    # transformers' attention layers are the modules that carry a config and an is_causal flag.
    layers = {id(m) for pretrained in switched for m in pretrained.modules() if hasattr(m, "is_causal") and hasattr(m, "config")}
    return {name: type(m) for name, m in model.named_modules() if id(m) in layers}
