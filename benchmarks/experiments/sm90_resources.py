"""What each Triton kernel costs an H100/H200 in shared memory, registers and spilled stack, read
without a GPU: the launchers run on meta tensors, each launch is compiled for sm_90 instead of
run, and cuobjdump (shipped with Triton) reports the cubin's resources. Flags a kernel over the
227 KB of shared memory a block may use (it would fail to launch) or with a stack (spilled
registers). Run it before a GPU session too: Triton's interpreter, which runs the kernels in CI,
accepts code the compiler refuses (a global that is not a constexpr was only found on an H100).

    python benchmarks/experiments/sm90_resources.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from genfast.kernels import (  # noqa: E402
    activation, attention, bias_act, cross_entropy, diffusion, losses, minibatch_stddev, norm, rnn, rotary, sampling,
)
from genfast.reference.diffusion import StepCoefficients  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448
LAUNCH_OPTIONS = ("num_warps", "num_stages")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_seen: set[str] = set()


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Triton's signature and constexprs of one launch, from its arguments."""
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature, constants = {}, {}
    for index, param in enumerate(fn.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constants[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constants


def _report(fn: JITFunction, args: tuple, kwargs: dict) -> None:
    signature, constants = _signature(fn, args, kwargs)
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    flags = {fn.arg_names[i[0]]: v for i, v in constants.items() if v is not None}
    key = f"{fn.__name__} {sorted(signature.items())} {flags} {options}"
    if key in _seen:
        return
    _seen.add(key)
    kernel = triton.compile(ASTSource(fn, signature, constants), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split()
                  if ":" in item)
    warning = "OVER SHARED MEMORY " if kernel.metadata.shared > SHARED_LIMIT else ""
    warning += "SPILLS " if int(fields.get("STACK", 0)) > 0 else ""
    pointer_types = sorted({t for t in signature.values() if t.startswith("*")})
    print(f"{fn.__name__:34} {','.join(pointer_types):18} shared {kernel.metadata.shared:6} regs {fields.get('REG'):>3} "
          f"stack {fields.get('STACK'):>5} {warning}{options} {flags}")


def main() -> None:
    JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: _report(self, args, kwargs)
    tile_config = attention.tile_config
    # Meta tensors are not "cuda": ask for the GPU's tiles.
    attention.tile_config = lambda direction, dtype, block_d, device_type: tile_config(direction, dtype, block_d,
                                                                                        "cuda")
    attention._multiprocessors = lambda device: 132
    meta = torch.device("meta")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for head_dim in (16, 64, 128, 256):
            q = torch.empty(2, 4, 300, head_dim, dtype=dtype, device=meta)
            k = torch.empty(2, 2, 300, head_dim, dtype=dtype, device=meta)
            for dropout_p in (0.0, 0.1):
                out, stats = attention.attention_forward(q, k, k, None, None, 0.1, 0.0, -1, 0, dropout_p, 2**40)
                attention.attention_backward(q, k, k, None, None, 0.1, 0.0, -1, 0, dropout_p, 2**40, out, stats, out,
                                             False)
            lengths = torch.empty(2, dtype=torch.int64, device=meta)
            attention.attention_decode(q[:, :, :1], k, k, lengths, None, None, 0.1, 0.0, -1, 0)
        if dtype != torch.float64:
            logits = torch.empty(4, 50257, dtype=dtype, device=meta)
            sampling.sample(logits, 0.8, 50, 0.9, torch.empty(4, device=meta))
    recurrences()
    elementwise()


def recurrences() -> None:
    """The recurrence kernels, which run in fp32 or fp64: LSTM with and without a projection,
    zoneout or norms, GRU, with lengths."""
    meta = torch.device("meta")
    for dtype in (torch.float32, torch.float64):
        for cell, gates, projection, extras in (("lstm", 4, None, ""), ("lstm", 4, 128, ""), ("lstm", 4, None, "zoneout"),
                                                ("lstm", 4, None, "norms"), ("gru", 3, None, "")):
            T, B, H = 100, 64, 512
            P = projection or H
            x_proj = torch.empty(T, B, gates * H, dtype=dtype, device=meta)
            weight_hh = torch.empty(gates * H, P, dtype=dtype, device=meta)
            h0, c0 = torch.empty(B, P, dtype=dtype, device=meta), torch.empty(B, H, dtype=dtype, device=meta)
            bias_hh = None if cell == "lstm" else torch.empty(gates * H, dtype=dtype, device=meta)
            weight_hr = None if projection is None else torch.empty(P, H, dtype=dtype, device=meta)
            lengths = torch.empty(B, dtype=torch.int64, device=meta)
            masks = (torch.empty(T, B, P, dtype=dtype, device=meta), torch.empty(T, B, H, dtype=dtype, device=meta))
            masks = masks if extras == "zoneout" else (None, None)
            norms = (torch.empty(2, 4 * H, dtype=dtype, device=meta), torch.empty(2, H, dtype=dtype, device=meta))
            norms = (*norms, 1e-5) if extras == "norms" else (None, None, 1e-5)
            output, _, _, *saved = rnn.recurrence_forward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths,
                                                          *masks, *norms, False, True)
            rnn.recurrence_backward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, *masks, *norms, False,
                                    output, None, None, [t for t in saved if t is not None])



def elementwise() -> None:
    """The memory-bound families, in each dtype their kernels take."""
    meta = torch.device("meta")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.empty(64, 1000, dtype=dtype, device=meta)
        for name in ("silu", "gelu", "gelu_tanh"):
            activation.activation_forward(x, None, name)
            activation.activation_backward(x, x, x, name)
        for name in ("linear", "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid"):
            bias = torch.empty(1000, dtype=dtype, device=meta)
            bias_act.bias_act_forward(x, bias, name, 0.2, 1.0, 256.0, 1)
            for order in (1, 2):
                bias_act.bias_act_backward(x, x, None, name, 0.2, 1.0, None, 1, order)
        for kind in ("mse", "bce_with_logits", "gaussian_kl", "softplus"):
            target = None if kind in ("gaussian_kl", "softplus") else x
            for reduce in (False, True):
                losses.loss_forward(x, target, kind, 1.0, reduce, 1.0)
                losses.loss_backward(torch.empty((), dtype=dtype, device=meta), x, target, kind, 1.0, reduce, 1.0,
                                     target is not None)
        losses.reparameterize_forward(x, x, x)
        losses.reparameterize_backward(x, x, x)
        images = torch.empty(8, 32, 9, 9, dtype=dtype, device=meta)
        out = minibatch_stddev.minibatch_stddev_forward(images, 4, 1)
        minibatch_stddev.minibatch_stddev_backward(out, images, 4, 1)
        weight = torch.empty(32, dtype=math_dtype, device=meta)
        for silu in (False, True):
            y, mean, rstd = norm.group_norm_forward(images, weight, weight, 8, 1e-5, silu)
            norm.group_norm_backward(y, images, weight, weight, mean, rstd, 8, silu)
        weight = torch.empty(1000, dtype=math_dtype, device=meta)
        for rms in (False, True):
            y, h, mean, rstd = norm.layer_norm_forward(x, x, weight, weight, 1e-5, rms)
            norm.layer_norm_backward(y, h, h, weight, mean, rstd, rms)
        logits = torch.empty(16, 50257, dtype=dtype, device=meta)
        cross_entropy.cross_entropy_rows(logits, torch.empty(16, dtype=torch.int64, device=meta), -100, 0.1,
                                         torch.empty(16, dtype=math_dtype, device=meta))
        if dtype != torch.float64:
            heads = torch.empty(2, 64, 12, 64, dtype=dtype, device=meta)
            angles = torch.empty(1, 64, 64, dtype=math_dtype, device=meta)
            for transpose in (False, True):
                rotary.rotary_embedding(heads, angles, angles, None, transpose)
            latents = torch.empty(4, 4, 32, 32, dtype=dtype, device=meta)
            steps = torch.empty(4, dtype=torch.int64, device=meta)
            c = StepCoefficients(sample_noise=0.5, x0_sample=1.0, x0_model=-0.5, prev_x0=0.5, prev_sample=0.5,
                                 prev_model=0.1, prev_history=0.1, prev_noise=0.2, clip=1.0)
            diffusion.denoise_step(latents, latents.repeat(2, 1, 1, 1), c, latents, latents, 7.5, True)
            diffusion.denoise_step(latents, latents, c, None, None, None, False, noise_seed=5)
            diffusion.add_noise(latents, latents, steps, torch.empty(1000, device=meta), True)
            diffusion.denoising_loss(latents, latents, torch.empty(4, device=meta), True)
    diffusion.timestep_embedding(torch.empty(4, device=meta), torch.empty(160, device=meta), 321, True, 1.0)


if __name__ == "__main__":
    main()
