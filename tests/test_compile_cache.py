"""genfast's sources are in torch.compile's cache key, so a graph compiled against another genfast
is not reused (its backward or its ops' arguments may have changed)."""

import shutil

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import genfast
from genfast.compile_cache import PACKAGE, source_digest, tag_compile_cache


def test_import_tags_the_cache_key_and_keeps_the_users_tag():
    assert f"genfast-{source_digest()}" in torch.compiler.config.cache_key_tag
    with torch.compiler.config.patch(cache_key_tag="mine"):
        tag_compile_cache()
        tag_compile_cache()
        assert torch.compiler.config.cache_key_tag == f"minegenfast-{source_digest()}"


def test_digest_changes_with_any_source(tmp_path):
    copy = tmp_path / "genfast"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert source_digest(copy) == source_digest()
    with open(copy / "ops" / "conv.py", "a") as f:
        f.write("\n")
    assert source_digest(copy) != source_digest()


def _compile_and_backpropagate():
    torch._dynamo.reset()
    norm = genfast.nn.GroupNorm(2, 4, activation="silu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch.compile(norm, fullgraph=True)(x).sum().backward()


def test_another_tag_misses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with torch._inductor.config.patch(fx_graph_cache=True):
        counters.clear()
        _compile_and_backpropagate()
        _compile_and_backpropagate()
        assert counters["inductor"]["fxgraph_cache_hit"] > 0, "the same sources should hit the cache"

        counters.clear()
        with torch.compiler.config.patch(cache_key_tag="genfast-of-another-version"):
            _compile_and_backpropagate()
        assert counters["inductor"]["fxgraph_cache_hit"] == 0
        assert counters["inductor"]["fxgraph_cache_miss"] > 0
    torch._dynamo.reset()
