"""torch.export of the GPT-style model and the U-Net built from genfast's layers: the exported
program holds genfast's custom ops, survives a save and load, and gives the eager model's outputs
at another batch size than the one it was traced with."""

import io

import pytest
import torch
from torch.export import Dim

from genfast.models.catalog import ARCHITECTURES, twins

from helpers import assert_like_torch_build

# Each architecture's inputs to its forward pass, from its batch.
INPUTS = {"gpt": lambda batch: (batch[0][:, :-1],), "unet": lambda batch: tuple(batch[:3])}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_exported_program_matches_eager_model(name):
    architecture = ARCHITECTURES[name]
    reference, fused = (model.eval() for model in twins(architecture, "check"))
    inputs = INPUTS[name](architecture.batch("check", torch.Generator().manual_seed(0)))
    batch = Dim("batch", min=1, max=64)
    program = torch.export.export(fused, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))

    genfast_ops = {str(node.target) for node in program.graph.nodes if str(node.target).startswith("genfast.")}
    assert genfast_ops, "the exported graph should call genfast's kernels, not a decomposition"

    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    loaded = torch.export.load(saved).module()

    # Not the traced inputs, and one sample fewer: the batch size stayed symbolic.
    other = INPUTS[name](architecture.batch("check", torch.Generator().manual_seed(1)))
    other = tuple(t[1:] for t in other)
    with torch.no_grad():
        got, eager, want = loaded(*other), fused(*other), reference(*other)
        exact = reference.double()(*(t.double() if t.is_floating_point() else t for t in other))
    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert_like_torch_build([name], [got], [want], [exact])
