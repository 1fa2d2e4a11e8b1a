"""Cross-entropy over rows of logits as one Triton program per row, and its launcher: the
kernel between the matrix products of genfast.ops.linear_cross_entropy. The specification:
genfast/reference/cross_entropy.py.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, target_ptr, scale_ptr, coefficient_ptr, loss_ptr, V, row_stride, ignore_index,
    HAS_GRAD: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    """loss[row] = logsumexp(z) - keep * z[t] - spread * sum(z), over the row's logits z and
    its target t, with (keep, spread) = coefficients = (1 - smoothing, smoothing / V); 0 where
    t is ignore_index. With HAS_GRAD, z is overwritten by its gradient
    scale[row] * (softmax(z) - keep * onehot(t) - spread), zero on an ignored row.

    The loss is kept as gaps from the row's maximum m, as the C++ kernel keeps it:
    keep * ((m - z[t]) + log_sum) + spread * (gaps + V * log_sum), with log_sum = log(sum exp(z - m))
    and gaps = sum (m - z). The logsumexp itself would round at m's magnitude, and a row of logits
    near 1e30 would lose the whole loss to it.

    Reads the row twice with HAS_GRAD (the second time from cache), once without; computes in
    MATH (float32, or float64 for float64 logits); writes loss (MATH) and the gradient in
    logits' dtype."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    keep = tl.load(coefficient_ptr).to(MATH)
    spread = tl.load(coefficient_ptr + 1).to(MATH)
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    # The op checks targets on the host, except under torch.compile: a target outside the
    # vocabulary is read as 0 and its row's loss and gradient are NaN.
    in_range = (target >= 0) & (target < V)

    # One read of the row, rescaling the sums as the maximum grows (flash attention's way).
    row_max = tl.full((), float("-inf"), MATH)
    exp_sum = tl.zeros((), MATH)
    gaps = tl.zeros((), MATH)
    for v0 in range(0, V, BLOCK):
        columns = v0 + tl.arange(0, BLOCK)
        z = tl.load(row_ptr + columns, mask=columns < V, other=float("-inf")).to(MATH)
        new_max = tl.maximum(row_max, tl.max(z, 0))
        # Until the row sees a logit above -inf its maximum is -inf: subtracting 0 keeps every exp at 0.
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
        exp_sum = exp_sum * tl.exp(row_max - pivot) + tl.sum(tl.exp(z - pivot), 0)
        # The v0 logits before this block lie new_max - row_max further below the maximum; a masked
        # logit (-inf) lies infinitely far below it, even while the maximum is -inf too.
        growth = tl.where(new_max == row_max, 0.0, new_max - row_max)
        below = tl.where(z == float("-inf"), float("inf"), new_max - z)
        gaps += tl.where(v0 > 0, v0 * growth, 0.0) + tl.sum(tl.where(columns < V, below, 0.0), 0)
        row_max = new_max
    log_sum = tl.log(exp_sum)
    target_logit = tl.load(row_ptr + tl.where(valid & in_range, target, 0)).to(MATH)
    # Without smoothing the gaps are not read: a masked logit makes them inf.
    loss = keep * ((row_max - target_logit) + log_sum) + tl.where(spread > 0, spread * (gaps + V * log_sum), 0.0)
    loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if HAS_GRAD:
        scale = tl.where(valid, tl.where(in_range, tl.load(scale_ptr + row).to(MATH), float("nan")), 0.0)
        for v0 in range(0, V, BLOCK):
            columns = v0 + tl.arange(0, BLOCK)
            z = tl.load(row_ptr + columns, mask=columns < V, other=0.0).to(MATH)
            softmax = tl.exp((z - row_max) - log_sum)
            grad = scale * (softmax - spread - tl.where(columns == target, keep, 0.0))
            tl.store(row_ptr + columns, grad.to(logits_ptr.dtype.element_ty), mask=columns < V)


def cross_entropy_rows(logits, target, ignore_index: int, smoothing: float, grad_scale):
    """The losses (rows,) of logits (rows, V) with unit stride along V, for target (rows,)
    int64; with grad_scale (rows,), logits are overwritten with their gradient."""
    rows, V = logits.shape
    math = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=math, device=logits.device)
    # A tensor, not scalar arguments: Triton passes Python floats as float32.
    coefficients = torch.tensor([1 - smoothing, smoothing / V], dtype=math, device=logits.device)
    _cross_entropy_rows_kernel[(rows,)](
        logits, target, loss if grad_scale is None else grad_scale, coefficients, loss, V, logits.stride(0),
        ignore_index, HAS_GRAD=grad_scale is not None, MATH=tl.float64 if math == torch.float64 else tl.float32,
        BLOCK=min(triton.next_power_of_2(V), 4096),
    )
    return loss
