"""The objectives: noise, timesteps and targets for DDPM (epsilon, v-prediction, sample; offset noise, input
perturbation, timestep bias, Min-SNR) and for flow matching (sigmas, noisy inputs, loss weights), and the one masked,
weighted loss.
"""



import torch

from trainkit.cli import InputError


def sample_noise(latents, generator, noise_offset=0.0):
    """Gaussian noise shaped like `latents`, plus per-channel offset noise when `noise_offset` > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    return noise


def sample_timesteps(batch_size, num_train_timesteps, generator, device, weights=None):
    """Training timesteps: uniform, or drawn with probabilities `weights` (from `timestep_bias_weights`, on
    `device`). Either way from `generator`, so a resumed run draws the same timesteps."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator).long()


TIMESTEP_BIAS_STRATEGIES = ("earlier", "later", "range", "none")


def check_timestep_bias(strategy, multiplier, begin, end, portion):
    """The --timestep_bias_* checks that need no model (the scheduler's timestep count is checked by
    `timestep_bias_weights`). Raises InputError."""
    if not 0 < portion <= 1:
        raise InputError(f"--timestep_bias_portion must be in (0, 1], got {portion}")
    if strategy == "none":
        return
    if multiplier <= 0:
        # Upstream's reason: a multiplier of 0 would stop training those timesteps altogether.
        raise InputError(f"--timestep_bias_multiplier must be > 0, got {multiplier} "
                         "(to train without a bias, use --timestep_bias_strategy none)")
    if strategy == "range":
        if begin < 0:
            raise InputError(f"--timestep_bias_begin must be >= 0, got {begin}")
        if begin >= end:
            raise InputError(f"--timestep_bias_strategy range needs --timestep_bias_begin < --timestep_bias_end, "
                             f"got {begin} and {end}")


def timestep_bias_weights(strategy, num_timesteps, multiplier=1.0, begin=0, end=1000, portion=0.25):
    """Sampling probabilities over the training timesteps for --timestep_bias_strategy (upstream SDXL's
    `generate_timestep_weights`): `multiplier` times the weight on the first (`earlier`) or last (`later`)
    `portion` of the timesteps, or on [begin, end) (`range`). None for `none`: plain uniform sampling."""
    if strategy == "none":
        return None
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise InputError(f"--timestep_bias_strategy {strategy!r} is not one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}")
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = int(portion * num_timesteps)
    if strategy == "earlier":
        biased = slice(0, count)
    elif strategy == "later":
        biased = slice(num_timesteps - count, num_timesteps)  # not slice(-count, None): count may be 0
    else:
        if end > num_timesteps:
            raise InputError(f"--timestep_bias_end {end} is past the scheduler's {num_timesteps} training timesteps")
        biased = slice(begin, end)
    weights[biased] *= multiplier
    return (weights / weights.sum()).float()


def perturb_noise(noise, input_perturbation, generator):
    """The noise actually added to the inputs under input perturbation (https://arxiv.org/abs/2301.11706); the loss
    target stays the unperturbed `noise`."""
    if not input_perturbation:
        return noise
    extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + input_perturbation * extra


def loss_target(noise_scheduler, prediction_type, clean, noise, timesteps):
    """What the network is trained to predict for `prediction_type` (epsilon, v_prediction or sample)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"Unknown prediction type {prediction_type!r}")


def min_snr_loss_weights(noise_scheduler, timesteps, snr_gamma, prediction_type):
    """Per-sample loss weights of Min-SNR-gamma (https://arxiv.org/abs/2303.09556), shaped (batch,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(prediction, target, weights=None, mask=None):
    """Mean squared error in fp32; with `weights` (batch,), a weighted mean of the per-sample errors.

    With `mask` (batch, 1, h, w) of latent-pixel weights (`mask_to_latents`), the mean error over the masked pixels:
    the masked squared error divided by the mask's mean, over the batch or, with `weights`, per sample. An all-ones
    mask therefore gives exactly the unmasked loss, and a zero-weight pixel has no gradient."""
    squared_error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        mask = mask.float().to(squared_error.device)
        squared_error = squared_error * mask
    if weights is None:
        if mask is None:
            return squared_error.mean()
        return squared_error.mean() / mask.mean().clamp_min(1e-8)
    dims = list(range(1, squared_error.ndim))
    per_sample = squared_error.mean(dim=dims)
    if mask is not None:
        per_sample = per_sample / mask.mean(dim=dims).clamp_min(1e-8)
    return (per_sample * weights.float()).mean()


# Flow matching (FLUX.1): the model predicts the velocity noise - latents along the straight path
# x_sigma = (1 - sigma) * latents + sigma * noise, with timesteps and loss weights from diffusers' SD3/Flux helpers.
FLOW_WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def sample_flow_matching_sigmas(scheduler, batch_size, weighting_scheme, generator, device, logit_mean=0.0,
                                logit_std=1.0, mode_scale=1.29):
    """(timesteps, sigmas (batch, 1, 1, 1)) for flow-matching training: positions drawn by diffusers'
    compute_density_for_timestep_sampling from `generator` (restorable), mapped onto the training schedule of the
    FlowMatchEulerDiscreteScheduler (its shifted sigmas), as upstream's Flux script maps them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale,
                                              device=generator.device, generator=generator)
    count = scheduler.config.num_train_timesteps
    indices = (u * count).long().clamp(0, count - 1)
    # Indexed where the positions were drawn: moving them to the host first would wait for the GPU every step.
    schedule_timesteps, schedule_sigmas = training_schedule(scheduler, indices.device)
    timesteps = schedule_timesteps[indices].to(device)
    sigmas = schedule_sigmas[indices].to(device).reshape(batch_size, 1, 1, 1)
    return timesteps, sigmas


def training_schedule(scheduler, device):
    """The scheduler's training timesteps and fp32 sigmas on `device`, copied there once per schedule."""
    key = (str(device), scheduler.timesteps.data_ptr(), scheduler.sigmas.data_ptr())
    cached = getattr(scheduler, "_training_schedule_copy", None)
    if cached is None or cached[0] != key:
        cached = (key, scheduler.timesteps.to(device), scheduler.sigmas.to(device=device, dtype=torch.float32))
        scheduler._training_schedule_copy = cached
    return cached[1], cached[2]


def flow_matching_inputs(latents, noise, sigmas):
    """(noisy latents, velocity target): the point at `sigmas` on the straight path from latents to noise, and
    the direction the model learns to predict there."""
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


def preconditioned_outputs(prediction, noisy_latents, sigmas):
    """The clean latents a velocity `prediction` at `sigmas` implies, noisy - sigma * velocity (the EDM-style output
    preconditioning of upstream SD3's --precondition_outputs, https://arxiv.org/abs/2206.00364 section 5), computed as
    upstream does; the loss then compares them with the latents."""
    return prediction * (-sigmas) + noisy_latents


def flow_matching_loss(prediction, target, sigmas, weighting_scheme, mask=None):
    """diffusion_loss weighted per sample by diffusers' compute_loss_weighting_for_sd3 (sigma_sqrt, cosmap; uniform
    otherwise), the same per-sample mean upstream's Flux script takes."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).reshape(-1)
    if weighting_scheme not in ("sigma_sqrt", "cosmap"):
        weights = None  # uniform: the plain mean, as diffusion_loss takes it
    return diffusion_loss(prediction, target, weights, mask=mask)
