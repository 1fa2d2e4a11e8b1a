"""The VAE and GAN losses and the reparameterised sample against the float64 reference and
PyTorch's own functions, with their gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS, assert_close_to_reference, assert_compiles_like_eager, check_bad_input, interpreted, require,
)

import genfast
from genfast.reference import losses as reference

# dtype and the absolute term of the error rule; float32 sums over more than 4k elements take
# the reduction's 1e-4 (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

# name: (genfast call, reference call); each takes (x, t, reduction).
LOSSES = {
    "mse": (lambda x, t, r: genfast.ops.mse_loss(x, t, reduction=r), reference.mse_loss),
    "bce_with_logits": (lambda x, t, r: genfast.ops.binary_cross_entropy_with_logits(x, t, reduction=r),
                        reference.binary_cross_entropy_with_logits),
    "gaussian_kl": (lambda x, t, r: genfast.ops.gaussian_kl_divergence(x, t, reduction=r),
                    reference.gaussian_kl_divergence),
}

# PyTorch's own, where it has the loss: the bound of the error rule.
TORCH_LOSSES = {
    "mse": lambda x, t, r: F.mse_loss(x, t, reduction=r),
    "bce_with_logits": lambda x, t, r: F.binary_cross_entropy_with_logits(x, t, reduction=r),
    "gaussian_kl": reference.gaussian_kl_divergence,
}

SHAPES = [(1,), (7,), (3, 5), (4, 1, 13), (2, 4099)]


def make_inputs(name, shape, device):
    x = torch.randn(shape, device=device) * 3
    t = torch.rand(shape, device=device) if name == "bce_with_logits" else torch.randn(shape, device=device)
    return x, t


def run(fn, inputs, dtype, reduction):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, reduction)
    dout = torch.linspace(-1, 1, out.numel(), dtype=dtype, device=out.device).reshape(out.shape)
    return out, torch.autograd.grad(out, leaves, dout if out.dim() else None)


def check_against_reference(backend, name, shape, dtype, atol, reduction):
    device = require(backend)
    inputs = make_inputs(name, shape, device)
    with genfast.use_backend(backend):
        out, grads = run(LOSSES[name][0], inputs, dtype, reduction)
    ref, ref_grads = run(LOSSES[name][1], inputs, torch.float64, reduction)
    torch_out, torch_grads = run(TORCH_LOSSES[name], inputs, dtype, reduction)
    assert out.dtype == dtype and out.shape == ref.shape
    atol = 1e-4 if dtype == torch.float32 and reduction != "none" and inputs[0].numel() > 4096 else atol
    assert_close_to_reference(out, ref, torch_out, atol, "loss")
    for what, grad, ref_grad, torch_grad in zip(("dx", "dt"), grads, ref_grads, torch_grads):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_matches_reference_fp32(backend, name, shape, reduction):
    check_against_reference(backend, name, shape, torch.float32, 1e-5, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_dtypes(backend, name, dtype, atol):
    check_against_reference(backend, name, (6, 50), dtype, atol, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_batchmean(backend):
    """The VAE's KL term: the sum over latent dimensions, averaged over the batch."""
    device = require(backend)
    mu, logvar = torch.randn(8, 16, device=device), torch.randn(8, 16, device=device)
    with genfast.use_backend(backend):
        kl = genfast.ops.gaussian_kl_divergence(mu, logvar, reduction="batchmean")
    expected = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / 8
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["non_saturating", "hinge"])
def test_gan_losses(backend, kind):
    device = require(backend)
    real, fake = torch.randn(16, 1, device=device), torch.randn(16, 1, device=device) * 2

    def losses(real, fake, module):
        real, fake = real.detach().requires_grad_(), fake.detach().requires_grad_()
        d_loss = module.discriminator_loss(real, fake, kind)
        g_loss = module.generator_loss(fake, kind)
        return [d_loss, g_loss, *torch.autograd.grad(d_loss, (real, fake)), *torch.autograd.grad(g_loss, fake)]

    with genfast.use_backend(backend):
        got = losses(real, fake, genfast.ops)
    ref = losses(real.double(), fake.double(), reference)
    torch_got = losses(real, fake, reference)
    for what, g, r, t in zip(("d_loss", "g_loss", "d real", "d fake", "g fake"), got, ref, torch_got):
        assert_close_to_reference(g, r, t, 1e-5, what)


def test_gan_losses_are_the_textbook_ones():
    real, fake = torch.randn(8, 1), torch.randn(8, 1)
    torch.testing.assert_close(genfast.ops.discriminator_loss(real, fake),
                               F.softplus(-real).mean() + F.softplus(fake).mean())
    torch.testing.assert_close(genfast.ops.discriminator_loss(real, fake, "hinge"),
                               F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    torch.testing.assert_close(genfast.ops.generator_loss(fake), F.softplus(-fake).mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_reparameterize(backend, dtype, atol):
    device = require(backend)
    mu, logvar, noise = (torch.randn(5, 37, device=device) for _ in range(3))
    dz = torch.randn(5, 37, device=device)

    def run_sample(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (mu, logvar, noise)]
        z = fn(*leaves)
        return z, torch.autograd.grad(z, leaves, dz.to(cast))

    with genfast.use_backend(backend):
        z, grads = run_sample(genfast.ops.reparameterize, dtype)
    ref, ref_grads = run_sample(reference.reparameterize, torch.float64)
    torch_z, torch_grads = run_sample(reference.reparameterize, dtype)
    assert_close_to_reference(z, ref, torch_z, atol, "z")
    for what, grad, ref_grad, torch_grad in zip(("dmu", "dlogvar", "dnoise"), grads, ref_grads, torch_grads):
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_draws_noise_as_torch(backend):
    """Without noise, it is torch.randn's from the generator: the same seed, the same sample."""
    device = require(backend)
    mu, logvar = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    with genfast.use_backend(backend):
        z = genfast.ops.reparameterize(mu, logvar, generator=torch.Generator(device).manual_seed(3))
    noise = torch.randn(4, 6, generator=torch.Generator(device).manual_seed(3), device=device)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * noise)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    device = require(backend)
    x, t = (torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    with genfast.use_backend(backend):
        for name, (fn, _) in LOSSES.items():
            assert torch.autograd.gradcheck(lambda x, t: fn(x, t, "mean"), (x, t), fast_mode=interpreted(backend)), name
        assert torch.autograd.gradcheck(lambda x, t: genfast.ops.discriminator_loss(x, t, "hinge"), (x, t),
                                        fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values(backend):
    """NaN and infinities give what the reference gives."""
    device = require(backend)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 90.0, -90.0], device=device)
    t = torch.full_like(x, 0.5)
    with genfast.use_backend(backend):
        for name, (fn, ref) in LOSSES.items():
            torch.testing.assert_close(fn(x, t, "none"), ref(x.double(), t.double(), "none").float(), equal_nan=True,
                                       msg=name)
        got = genfast.ops.discriminator_loss(x, x.flip(0))
    assert got.isnan()
    for kind in ("non_saturating", "hinge"):  # the gradient at NaN is the reference's (torch's relu passes it)
        grads = []
        for which in (backend, "reference"):
            real, fake = x.clone().requires_grad_(), x.flip(0).requires_grad_()
            with genfast.use_backend(which):
                grads.append(torch.autograd.grad(genfast.ops.discriminator_loss(real, fake, kind), (real, fake)))
        torch.testing.assert_close(*grads, equal_nan=True, msg=kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    x = torch.randn(0, 3, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        loss = genfast.ops.mse_loss(x, torch.randn(0, 3, device=device), reduction="sum")
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == x.shape


BAD_INPUTS = [  # (call, error type, words the message must contain)
    (lambda: genfast.ops.mse_loss(torch.randn(3), torch.randn(4)), ValueError, "target"),
    (lambda: genfast.ops.mse_loss(torch.randn(3), torch.randn(3, dtype=torch.float64)), TypeError, "target"),
    (lambda: genfast.ops.mse_loss(torch.ones(3, dtype=torch.int64), torch.ones(3)), TypeError, "input"),
    (lambda: genfast.ops.mse_loss(torch.randn(3), torch.randn(3), reduction="batchmean"), ValueError, "reduction"),
    (lambda: genfast.ops.gaussian_kl_divergence(torch.randn(()), torch.randn(()), reduction="batchmean"),
     ValueError, "batch"),
    (lambda: genfast.ops.discriminator_loss(torch.randn(3), torch.randn(3), "wasserstein"), ValueError, "kind"),
    (lambda: genfast.ops.reparameterize(torch.randn(3), torch.randn(4)), ValueError, "logvar"),
    (lambda: genfast.ops.reparameterize(torch.randn(3), torch.randn(3), torch.randn(3, device="meta")),
     ValueError, "noise"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, words", BAD_INPUTS)
def test_bad_input(backend, call, error, words):
    check_bad_input(backend, call, error, words)


def test_extension_checks_its_arguments():
    ext = require("cpu") and genfast.backends.extension()
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="loss must be one of"):
        ext.loss_forward(x, x, "l1", 1.0, True, 1.0)
    with pytest.raises(RuntimeError, match="takes no target"):
        ext.loss_forward(x, x, "hinge", 1.0, True, 1.0)
    with pytest.raises(RuntimeError, match="t must be"):
        ext.loss_forward(x, x.mT.contiguous().mT[:, :5], "mse", 1.0, True, 1.0)
    with pytest.raises(RuntimeError, match="grad must be"):
        ext.loss_backward(torch.ones(2), x, x, "mse", 1.0, True, 1.0, False)
    with pytest.raises(RuntimeError, match="noise must be"):
        ext.reparameterize_forward(x, x, torch.randn(4, 5))


class _VAELoss(torch.nn.Module):
    def forward(self, x):
        mu, logvar = x.chunk(2, dim=-1)
        z = genfast.ops.reparameterize(mu, logvar, torch.ones_like(mu))
        recon = genfast.ops.binary_cross_entropy_with_logits(z, torch.sigmoid(mu.detach()), reduction="none")
        return recon + genfast.ops.gaussian_kl_divergence(mu, logvar, reduction="batchmean")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_VAELoss(), torch.randn(3, 8), compiler)
