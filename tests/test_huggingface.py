"""genfast.optimize on Hugging Face transformers' GPT-2 and Llama models, built from small
configs (no weights are downloaded): the patched model's logits and the gradients of a
training step against the unpatched model's, skipped where transformers is not installed."""

import copy

import pytest
import torch
from helpers import assert_like_torch_build, require

import genfast

transformers = pytest.importorskip("transformers")
from genfast import huggingface  # noqa: E402  (imports transformers)


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=97, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=80, vocab_size=97,
                                      max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


EXPECTED_SWAPS = {  # model -> {qualified name ending: the class it had}
    gpt2: {"h.0.ln_1": torch.nn.LayerNorm, "h.0.mlp.act": transformers.activations.NewGELUActivation,
           "h.0.attn": transformers.models.gpt2.modeling_gpt2.GPT2Attention, "ln_f": torch.nn.LayerNorm},
    llama: {"layers.0.input_layernorm": transformers.models.llama.modeling_llama.LlamaRMSNorm,
            "layers.0.mlp": transformers.models.llama.modeling_llama.LlamaMLP,
            "layers.1.self_attn": transformers.models.llama.modeling_llama.LlamaAttention,
            "model.norm": transformers.models.llama.modeling_llama.LlamaRMSNorm},
}


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_optimize_swaps_layers_and_attention(build):
    torch.manual_seed(0)
    model = build()
    keys = list(model.state_dict())
    swapped = genfast.optimize(model)
    for suffix, original in EXPECTED_SWAPS[build].items():
        assert [swapped[name] for name in swapped if name.endswith(suffix)] == [original], suffix
    assert model.config._attn_implementation == huggingface.ATTENTION
    assert list(model.state_dict()) == keys
    assert genfast.optimize(model) == {}, "a second call finds nothing left to swap"


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left padding"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_patched_model_matches(build, backend, padded):
    """Logits and every parameter's gradient of a training step, within twice the error of
    the unpatched fp32 model against the float64 one, plus DESIGN.md's fp32 term."""
    device = require(backend)
    torch.manual_seed(0)
    reference = build().to(device)
    exact = copy.deepcopy(reference).double()
    patched = copy.deepcopy(reference)
    genfast.optimize(patched)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 97, (3, 11), generator=generator).to(device)
    mask = torch.ones_like(tokens)
    if padded:  # left padding, as batched generation pads
        mask[1, :4] = 0
        mask[2, :9] = 0

    def step(model):
        out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
        real = mask.bool()  # padded positions' logits are meaningless
        return [out.logits[real], *torch.autograd.grad(out.loss, list(model.parameters()))]

    with genfast.use_backend(backend):
        got = step(patched)
    names = ["logits", *(name for name, _ in patched.named_parameters())]
    assert_like_torch_build(names, got, step(reference), step(exact))


def test_generation_matches_unpatched():
    """Greedy generation with transformers' KV cache: the same tokens, the decode steps
    through genfast's attention with one query."""
    require("cpu")
    torch.manual_seed(0)
    reference = llama().eval()
    patched = copy.deepcopy(reference)
    genfast.optimize(patched)
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    arguments = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with genfast.use_backend("cpu"):
        tokens = patched.generate(prompt, **arguments)
    assert torch.equal(tokens, reference.generate(prompt, **arguments))
