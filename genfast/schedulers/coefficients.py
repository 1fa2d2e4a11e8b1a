"""Per-step scalars of each scheduler family for genfast.ops.denoise_step,
worked out on the host from schedule values (plain floats: no tensor, no
device sync). Each function follows the diffusers step it fuses, term by term.
"""

from __future__ import annotations

import math

from ..reference.diffusion import StepCoefficients

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _x0_and_eps(prediction_type: str, alpha_prod_t: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """((x0_sample, x0_model), (eps_sample, eps_model)): the predicted clean
    sample and noise, each as a * sample + b * model_output."""
    a, b = math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (1 / a, -b / a), (0.0, 1.0)
    if prediction_type == "sample":
        return (0.0, 1.0), (1 / b, -a / b)
    if prediction_type == "v_prediction":
        return (a, -b), (b, a)
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def ddim(
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    prediction_type: str,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    clip: float | None = None,
) -> StepCoefficients:
    """DDIMScheduler.step: prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std noise,
    std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))."""
    (x0_sample, x0_model), (eps_sample, eps_model) = _x0_and_eps(prediction_type, alpha_prod_t)
    eps_x0 = 0.0
    if use_clipped_model_output:  # eps recomputed from the clipped x0
        a, b = math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t)
        eps_sample, eps_model, eps_x0 = 1 / b, 0.0, -a / b
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * math.sqrt(variance)
    direction = math.sqrt(max(1 - alpha_prod_t_prev - std**2, 0.0))
    return StepCoefficients(
        x0_sample=x0_sample,
        x0_model=x0_model,
        prev_x0=math.sqrt(alpha_prod_t_prev) + direction * eps_x0,
        prev_sample=direction * eps_sample,
        prev_model=direction * eps_model,
        prev_noise=std,
        clip=clip,
    )


DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


def ddpm(
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    prediction_type: str,
    variance_type: str = "fixed_small",
    clip: float | None = None,
) -> StepCoefficients:
    """DDPMScheduler.step: prev = c0 x0 + c1 sample + std noise with the
    posterior coefficients c0, c1 and the variance_type's std (per element,
    from the model's variance channels, for learned_range)."""
    (x0_sample, x0_model), _ = _x0_and_eps(prediction_type, alpha_prod_t)
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    variance = max(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
    learned_variance = None
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = math.sqrt(variance)
    elif variance_type == "fixed_large":
        std = math.sqrt(current_beta_t)
    elif variance_type == "learned_range":
        std, learned_variance = 1.0, (math.log(variance), math.log(current_beta_t))
    else:
        raise ValueError(f"variance_type must be one of {list(DDPM_VARIANCE_TYPES)}, got {variance_type!r}")
    return StepCoefficients(
        x0_sample=x0_sample,
        x0_model=x0_model,
        prev_x0=math.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t,
        prev_sample=math.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t,
        prev_noise=std,
        clip=clip,
        learned_variance=learned_variance,
    )


def _x0_from_sigma(prediction_type: str, sigma: float, sigma_hat: float) -> tuple[float, float]:
    """(x0_sample, x0_model) of the Karras-style schedulers, x = x0 + sigma * eps."""
    if prediction_type in ("sample", "original_sample"):
        return 0.0, 1.0
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def euler(sigma: float, sigma_next: float, prediction_type: str, gamma: float = 0.0, s_noise: float = 1.0):
    """EulerDiscreteScheduler.step: with churn gamma, x = sample + s_noise * sqrt(sigma_hat^2 - sigma^2)
    noise at sigma_hat = sigma (1 + gamma); prev = x + (x - x0) / sigma_hat * (sigma_next - sigma_hat)."""
    sigma_hat = sigma * (gamma + 1)
    x0_sample, x0_model = _x0_from_sigma(prediction_type, sigma, sigma_hat)
    step = (sigma_next - sigma_hat) / sigma_hat
    return StepCoefficients(
        sample_noise=s_noise * math.sqrt(sigma_hat**2 - sigma**2) if gamma > 0 else 0.0,
        x0_sample=x0_sample,
        x0_model=x0_model,
        prev_sample=1 + step,
        prev_x0=-step,
    )


def euler_ancestral(sigma: float, sigma_next: float, prediction_type: str) -> StepCoefficients:
    """EulerAncestralDiscreteScheduler.step: an Euler step to sigma_down, then noise of sigma_up."""
    if prediction_type == "sample":
        raise NotImplementedError("prediction_type not implemented yet: sample")  # as diffusers
    x0_sample, x0_model = _x0_from_sigma(prediction_type, sigma, sigma)
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    step = (sigma_down - sigma) / sigma
    return StepCoefficients(
        x0_sample=x0_sample, x0_model=x0_model, prev_sample=1 + step, prev_x0=-step, prev_noise=sigma_up
    )


def flow_match_euler(sigma: float, sigma_next: float, stochastic: bool = False) -> StepCoefficients:
    """FlowMatchEulerDiscreteScheduler.step: prev = sample + (sigma_next - sigma) * velocity, or
    with stochastic sampling prev = (1 - sigma_next) x0 + sigma_next noise, x0 = sample - sigma v."""
    if stochastic:
        return StepCoefficients(x0_sample=1.0, x0_model=-sigma, prev_x0=1 - sigma_next, prev_noise=sigma_next)
    return StepCoefficients(prev_sample=1.0, prev_model=sigma_next - sigma)


DPM_SOLVER_TYPES = ("midpoint", "heun")


def _alpha_sigma(sigma: float, flow: bool) -> tuple[float, float]:
    """(alpha_t, sigma_t) of x = alpha_t x0 + sigma_t eps, from a Karras sigma or a flow-matching one."""
    if flow:
        return 1 - sigma, sigma
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _log_snr(alpha: float, sigma: float) -> float:
    return math.log(alpha) - math.log(sigma) if sigma > 0 else math.inf


def dpm_solver_multistep(
    sigma: float,
    sigma_next: float,
    prediction_type: str,
    sigma_before: float | None = None,
    solver_type: str = "midpoint",
    stochastic: bool = False,
    flow: bool = False,
) -> StepCoefficients:
    """DPMSolverMultistepScheduler.step for DPM-Solver++ (its SDE variant when stochastic),
    of order 2 given sigma_before, the sigma of the step before, else of order 1.

    The x0 prediction D0 is denoised; the one of the step before comes in as history,
    and the second-order term D1 = (D0 - history) / r0, r0 = h_0 / h, over the log-SNR
    steps h = lambda_next - lambda, h_0 = lambda - lambda_before:
        ODE: prev = (s_next / s) x + a_next (1 - e) D0 + k D1,        e = exp(-h)
        SDE: prev = (s_next / s) e x + a_next (1 - e^2) D0 + k D1 + s_next sqrt(1 - e^2) noise
    with k half the D0 coefficient (midpoint) or a_next ((e - 1) / h + 1), resp.
    a_next ((e^2 - 1) / (2 h) + 1) for the SDE (heun)."""
    if solver_type not in DPM_SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {list(DPM_SOLVER_TYPES)}, got {solver_type!r}")
    alpha, s = _alpha_sigma(sigma, flow)
    alpha_next, s_next = _alpha_sigma(sigma_next, flow)
    x0_sample, x0_model = {
        "epsilon": (1 / alpha, -s / alpha),
        "sample": (0.0, 1.0),
        "v_prediction": (alpha, -s),
        "flow_prediction": (1.0, -sigma),
    }.get(prediction_type, (None, None))
    if x0_sample is None:
        raise ValueError(f"prediction_type must be one of {[*PREDICTION_TYPES, 'flow_prediction']}, "
                         f"got {prediction_type!r}")
    lam = _log_snr(alpha, s)
    h = _log_snr(alpha_next, s_next) - lam
    rate = 2 if stochastic else 1
    e, decay = math.exp(-h), math.exp(-rate * h)
    prev_x0 = alpha_next * (1 - decay)
    prev_history = 0.0
    if sigma_before is not None and h > 0:  # h = 0 (a repeated last sigma) leaves the sample as it is
        if solver_type == "midpoint":
            k = 0.5 * prev_x0
        else:
            k = alpha_next * (math.expm1(-rate * h) / (rate * h) + 1)
        d1 = k * h / (lam - _log_snr(*_alpha_sigma(sigma_before, flow)))  # k / r0
        prev_x0, prev_history = prev_x0 + d1, -d1
    return StepCoefficients(
        x0_sample=x0_sample,
        x0_model=x0_model,
        prev_x0=prev_x0,
        prev_sample=s_next / s * (e if stochastic else 1.0),
        prev_history=prev_history,
        prev_noise=s_next * math.sqrt(1 - decay) if stochastic else 0.0,
    )


def lcm(
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    prediction_type: str,
    c_skip: float,
    c_out: float,
    clip: float | None = None,
    last: bool = False,
) -> StepCoefficients:
    """LCMScheduler.step: denoised = c_out x0 + c_skip sample, then, but at the last step,
    prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) noise."""
    (x0_sample, x0_model), _ = _x0_and_eps(prediction_type, alpha_prod_t)
    scale = 1.0 if last else math.sqrt(alpha_prod_t_prev)
    return StepCoefficients(
        x0_sample=x0_sample,
        x0_model=x0_model,
        prev_x0=scale * c_out,
        prev_sample=scale * c_skip,
        prev_noise=0.0 if last else math.sqrt(1 - alpha_prod_t_prev),
        out_x0=c_out,
        out_sample=c_skip,
        clip=clip,
    )

