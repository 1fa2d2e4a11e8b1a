"""genfast's sources in torch.compile's cache key.

torch.compile keys its on-disk caches (FX graph, AOTAutograd) by the traced forward graph, which
names genfast's custom ops but holds neither their schemas nor the backward each registers
(pytorch/pytorch#144344). After genfast changes an op, a cached graph from the older genfast would
run the old backward, or call the op with the old arguments: CI hit exactly that when an argument
was added to `genfast::conv2d_winograd_filters_backward`. Appending a digest of genfast's Python
sources to `torch.compiler.config.cache_key_tag` makes such a graph a cache miss; it costs each
upgrade of genfast one recompile of the user's graphs, and importing genfast about 2 ms here.
"""

import hashlib
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent


def source_digest(package: Path = PACKAGE) -> str:
    """A digest of every .py file under package, their paths and their bytes."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_cache() -> None:
    """Appends genfast's digest to the user's cache_key_tag (kept, not replaced); once per process."""
    tag = f"genfast-{source_digest()}"
    if tag not in torch.compiler.config.cache_key_tag:
        torch.compiler.config.cache_key_tag += tag
