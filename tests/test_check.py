"""`genfast check` and the architectures it runs: the VAE, GAN and MLP's genfast builds against
their torch.nn builds on every backend, and the check's own verdicts."""

import pytest
import torch
from helpers import assert_like_torch_build, require

import genfast
from genfast import check
from genfast.cli import main
from genfast.models.catalog import ARCHITECTURES, twins


# Not "cuda": only some of an architecture's ops have CUDA C++ kernels, and an explicit backend
# refuses the others (the CUDA kernels are tested op by op).
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("name", ["mlp", "vae", "gan"])
def test_training_step_matches_torch_layers(backend, name):
    """Outputs, loss and every parameter's gradient (the GAN's through its R1 penalty's second order).
    The torch.nn build runs on the same device: on a GPU both take cuDNN's convolutions in TF32."""
    device = require(backend)
    architecture = ARCHITECTURES[name]
    reference, fused = twins(architecture, "check")
    exact = architecture.build(False, "check").double()
    exact.load_state_dict(reference.state_dict())
    batch = architecture.batch("check", torch.Generator().manual_seed(5))

    def step(model, dtype, device="cpu"):
        inputs = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch)
        loss = architecture.loss(model, inputs)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return [t.cpu() for t in (architecture.outputs(model, inputs), loss, *grads)]

    with genfast.use_backend(backend):
        got = step(fused.to(device), torch.float32, device)
    names = ["outputs", "loss", *(name for name, _ in fused.named_parameters())]
    assert_like_torch_build(names, got, step(reference.to(device), torch.float32, device), step(exact, torch.float64))


def test_builds_share_state_dict_and_use_genfast_layers():
    for name in ("mlp", "vae", "gan"):
        reference, fused = twins(ARCHITECTURES[name], "check")
        assert reference.state_dict().keys() == fused.state_dict().keys()
        genfast_modules = (genfast.nn.Linear, genfast.nn.Conv2d, genfast.nn.GroupNorm)
        assert any(isinstance(m, genfast_modules) for m in fused.modules()), name
        assert not any(isinstance(m, genfast_modules) for m in reference.modules()), name


def test_check_passes(capsys):
    require("cpu")
    assert main(["check", "mlp", "gan", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "mlp" in output and "gan" in output and "MISMATCH" not in output


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A genfast layer off by 0.1% makes the check fail: its verdicts are not a formality."""
    require("cpu")
    exact = genfast.nn.bias_act.linear_bias_act
    monkeypatch.setattr(genfast.nn.bias_act, "linear_bias_act", lambda *args: exact(*args) * 1.001)
    assert main(["check", "mlp", "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_check_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="unknown architectures"):
        check.run(["resnet"])
