import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    _convert = interpreter._implicit_cvt

    def _float_as_compiled(arg):
        """A Python float argument as a compiled kernel takes it: float32. The interpreter keeps it
        a float64 scalar, which hid a float64 kernel's eps rounded to float32 until a GPU ran it."""
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return _convert(arg)

    interpreter._implicit_cvt = _float_as_compiled
