"""The losses of VAEs and GANs as the custom op genfast::loss: each element's term and its
reduction in one pass, where PyTorch runs each operation of the formula as a pass of its own
(binary cross-entropy with logits: six), and the gradient in one more. The VAE's reparameterised
sample is one pass too. Terms: genfast/reference/losses.py.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ._autograd import eager_function
from ._checks import check_choice, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_REDUCTIONS = ("none", "mean", "sum")


def _scale(x: Tensor, reduction: str) -> float:
    """What the sum of the terms is multiplied by."""
    if reduction == "mean":
        return 1 / x.numel()
    return 1 / x.shape[0] if reduction == "batchmean" else 1.0


def _forward(x: Tensor, t: Tensor | None, kind: str, sign: float, reduction: str, backend: str) -> Tensor:
    """Each element's term, or their reduction (0-dim); x and t contiguous, of one shape."""
    return kernels(backend, "losses").loss_forward(x, t, kind, sign, reduction != "none", _scale(x, reduction))


def _backward(
    grad: Tensor, x: Tensor, t: Tensor | None, kind: str, sign: float, reduction: str, target_grad: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(dx, dt), dt empty unless target_grad."""
    dx, dt = kernels(backend, "losses").loss_backward(
        grad, x, t, kind, sign, reduction != "none", _scale(x, reduction), target_grad
    )
    return dx, x.new_empty(0) if dt is None else dt


loss_op = torch.library.custom_op("genfast::loss", _forward, mutates_args=())
loss_backward_op = torch.library.custom_op("genfast::loss_backward", _backward, mutates_args=())


@loss_op.register_fake
def _(x, t, kind, sign, reduction, backend):
    return torch.empty_like(x) if reduction == "none" else x.new_empty(())


@loss_backward_op.register_fake
def _(grad, x, t, kind, sign, reduction, target_grad, backend):
    return torch.empty_like(x), torch.empty_like(x) if target_grad else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, t, *params = inputs
    ctx.save_for_backward(x, t)
    ctx.params = params


def _differentiate(ctx, grad, backward):
    if grad is None:
        return (None,) * 6
    x, t = ctx.saved_tensors
    kind, sign, reduction, backend = ctx.params
    target_grad = t is not None and ctx.needs_input_grad[1]
    dx, dt = backward(grad.contiguous(), x, t, kind, sign, reduction, target_grad, backend)
    return dx, dt if target_grad else None, None, None, None, None


loss_op.register_autograd(functools.partial(_differentiate, backward=loss_backward_op), setup_context=_setup_context)
_LossFunction = eager_function(
    "genfast.Loss", _forward, _setup_context, functools.partial(_differentiate, backward=_backward)
)


def _loss(kind: str, x: Tensor, t: Tensor | None, reduction: str, names: tuple[str, str], sign: float = 1.0) -> Tensor:
    check_tensor(names[0], x)
    if t is not None:
        check_tensor(names[1], t, shape=tuple(x.shape), like=x)
        if t.dtype != x.dtype:
            raise TypeError(f"{names[1]} must have {names[0]}'s dtype {x.dtype}, got {t.dtype}")
    if reduction == "batchmean" and x.dim() == 0:
        raise ValueError(f"reduction 'batchmean' needs a batch dimension, got {names[0]} of shape ()")
    backend = resolve("loss", x.device, _IMPLEMENTED)
    if backend == "reference" or x.numel() == 0:
        return reference.losses.loss(kind, x, t, reduction, sign)
    args = (x.contiguous(), None if t is None else t.contiguous(), kind, sign, reduction, backend)
    return loss_op(*args) if torch.compiler.is_compiling() else _LossFunction.call(*args)[0]


def mse_loss(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """torch.nn.functional.mse_loss: (input - target)^2, reduced. target must have input's shape
    (torch broadcasts a different one, with a warning)."""
    check_choice("reduction", reduction, _REDUCTIONS)
    return _loss("mse", input, target, reduction, ("input", "target"))


def binary_cross_entropy_with_logits(
    input: Tensor, target: Tensor, weight: Tensor | None = None, *, reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """torch.nn.functional.binary_cross_entropy_with_logits, in one pass. With weight or
    pos_weight it runs torch's own."""
    check_choice("reduction", reduction, _REDUCTIONS)
    if weight is not None or pos_weight is not None:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight
        )
    return _loss("bce_with_logits", input, target, reduction, ("input", "target"))


def gaussian_kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, -(1 + logvar - mu^2 - exp(logvar)) / 2,
    reduced: "none", "sum", "mean", or "batchmean" (the sum over mu.shape[0], the per-sample KL
    of a VAE's evidence lower bound)."""
    check_choice("reduction", reduction, (*_REDUCTIONS, "batchmean"))
    return _loss("gaussian_kl", mu, logvar, reduction, ("mu", "logvar"))


_GAN_LOSSES = ("non_saturating", "hinge")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """A GAN discriminator's loss from its logits on real and fake samples:
    mean softplus(-real) + mean softplus(fake) (non-saturating), or
    mean max(0, 1 - real) + mean max(0, 1 + fake) (hinge)."""
    check_choice("kind", kind, _GAN_LOSSES)
    term = "softplus" if kind == "non_saturating" else "hinge"
    return (_loss(term, real_logits, None, "mean", ("real_logits", ""), -1.0)
            + _loss(term, fake_logits, None, "mean", ("fake_logits", ""), 1.0))


def generator_loss(fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """A GAN generator's loss from the discriminator's logits on its samples: mean softplus(-fake)
    (non-saturating), or -mean fake (hinge, one op of torch's)."""
    check_choice("kind", kind, _GAN_LOSSES)
    if kind == "hinge":
        check_tensor("fake_logits", fake_logits)
        return -fake_logits.mean()
    return _loss("softplus", fake_logits, None, "mean", ("fake_logits", ""), -1.0)


def _reparameterize_forward(mu: Tensor, logvar: Tensor, noise: Tensor, backend: str) -> Tensor:
    return kernels(backend, "losses").reparameterize_forward(mu, logvar, noise)


def _reparameterize_backward(dz: Tensor, logvar: Tensor, noise: Tensor, backend: str) -> Tensor:
    return kernels(backend, "losses").reparameterize_backward(dz, logvar, noise)


reparameterize_op = torch.library.custom_op("genfast::reparameterize", _reparameterize_forward, mutates_args=())
reparameterize_backward_op = torch.library.custom_op(
    "genfast::reparameterize_backward", _reparameterize_backward, mutates_args=()
)


@reparameterize_op.register_fake
def _(mu, logvar, noise, backend):
    return torch.empty_like(mu)


@reparameterize_backward_op.register_fake
def _(dz, logvar, noise, backend):
    return torch.empty_like(logvar)


def _setup_reparameterize(ctx, inputs, output):
    mu, logvar, noise, backend = inputs
    ctx.save_for_backward(logvar, noise)
    ctx.backend = backend


def _differentiate_reparameterize(ctx, dz, backward):
    """dmu = dz; dlogvar by the kernel; dnoise = dz e^(logvar / 2) (rarely asked, by torch)."""
    if dz is None:
        return (None,) * 4
    logvar, noise = ctx.saved_tensors
    dz = dz.contiguous()
    dlogvar = backward(dz, logvar, noise, ctx.backend) if ctx.needs_input_grad[1] else None
    dnoise = dz * torch.exp(0.5 * logvar) if ctx.needs_input_grad[2] else None
    return dz, dlogvar, dnoise, None


reparameterize_op.register_autograd(
    functools.partial(_differentiate_reparameterize, backward=reparameterize_backward_op),
    setup_context=_setup_reparameterize,
)
_ReparameterizeFunction = eager_function(
    "genfast.Reparameterize", _reparameterize_forward, _setup_reparameterize,
    functools.partial(_differentiate_reparameterize, backward=_reparameterize_backward),
)


def reparameterize(
    mu: Tensor, logvar: Tensor, noise: Tensor | None = None, *, generator: torch.Generator | None = None
) -> Tensor:
    """A VAE's sample of N(mu, exp(logvar)), mu + exp(logvar / 2) * noise, differentiable in mu
    and logvar. noise: by default ``torch.randn_like(mu)`` drawn from generator, as a VAE draws it."""
    check_tensor("mu", mu)
    check_tensor("logvar", logvar, shape=tuple(mu.shape), like=mu)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have mu's dtype {mu.dtype}, got {logvar.dtype}")
    if noise is None:
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    else:
        check_tensor("noise", noise, shape=tuple(mu.shape), like=mu)
        if noise.dtype != mu.dtype:
            raise TypeError(f"noise must have mu's dtype {mu.dtype}, got {noise.dtype}")
    backend = resolve("reparameterize", mu.device, _IMPLEMENTED)
    if backend == "reference" or mu.numel() == 0:
        return reference.losses.reparameterize(mu, logvar, noise)
    args = (mu.contiguous(), logvar.contiguous(), noise.contiguous(), backend)
    return reparameterize_op(*args) if torch.compiler.is_compiling() else _ReparameterizeFunction.call(*args)[0]
