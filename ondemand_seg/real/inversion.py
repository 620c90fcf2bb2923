"""Deterministic inversion: a real image's latent carried to a point of the schedule by the model's
own predictions instead of random noise.

For one image-to-image pass, :func:`inverted_start` makes the pipeline's noising step return the
clean latent, computes on the denoiser's first call the latent the model's own predictions lead to
at that call's timestep, and puts it in place of the clean latent there and in the scheduler's
first step. Everything else (VAE encoding, text encoding, SDXL's added conditions, Flux's packed
latents and ids, classifier-free guidance) stays the pipeline's, since the inversion's denoiser
calls reuse the arguments of the pipeline's own first call with only the latent and the timestep
changed. The capture records nothing during the inversion calls.

Two updates, by how the family's scheduler reads its latents:

- noise-prediction families (SD 1.x/2.x, SDXL; epsilon or v prediction): DDIM run backwards
  (Song et al., ICLR 2021, eq. 12; the update of diffusers' ``DDIMInverseScheduler.step``), on the
  variance-preserving latent the UNet reads (Euler's scaled input is that latent too);
- flow-matching families (SD3/3.5, Flux): Euler run forward in sigma, ``x ← x + (σ' − σ)·v(x, σ)``
  (the plain rectified-flow inversion of Rout et al., "Semantic image inversion and editing using
  rectified stochastic differential equations", 2024).

Written here rather than with ``DDIMInverseScheduler``: that scheduler makes its own timestep
grid from its ``steps_offset`` and spacing, while the inversion has to end exactly at the first
timestep of the pipeline's scheduler (DDIM, Euler or flow-matching, whose timesteps are used here
as they are); diffusers ships no inverse flow-matching scheduler.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The Flux pipelines pass the denoiser ``timestep / 1000``; the others pass the scheduler's timestep.
_TIMESTEP_DIVISOR = {"flux": 1000.0}


def _sample_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return kwargs["sample"] if "sample" in kwargs else args[0]


def _with(args: tuple, kwargs: dict, sample: torch.Tensor, timestep) -> tuple[tuple, dict]:
    """The denoiser call's arguments with ``sample`` and ``timestep`` swapped in."""
    args, kwargs = list(args), dict(kwargs)
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = sample
    elif "sample" in kwargs:
        kwargs["sample"] = sample
    else:
        args[0] = sample
    if "timestep" in kwargs:
        kwargs["timestep"] = timestep
    elif len(args) > 1:
        args[1] = timestep
    return tuple(args), kwargs


def _timestep_of(args: tuple, kwargs: dict):
    return kwargs["timestep"] if "timestep" in kwargs else args[1]


def _as_timestep(like, value: float):
    return torch.full_like(like, value) if torch.is_tensor(like) else value


@contextlib.contextmanager
def inverted_start(pipeline, denoiser: torch.nn.Module, family: str, store) -> Iterator[None]:
    """Within this context, each call of ``pipeline`` (an image-to-image pipeline) starts from the
    image's inverted latent instead of its randomly noised one.

    Args:
        pipeline: the image-to-image pipeline; its scheduler's noising (``add_noise`` or
            ``scale_noise``) and ``step`` are wrapped for the context and restored after.
        denoiser: the pipeline's UNet or transformer.
        family: the family name (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``).
        store: the capture's :class:`~ondemand_seg.generation.capture.AttentionStore`, kept from
            recording during the inversion's denoiser calls.

    The inversion runs with the call's own text conditioning without classifier-free guidance: the
    conditional half of a guided batch, the class prompt the recorded steps read with, as null-text
    inversion's DDIM pass does (Mokady et al., CVPR 2023), which is also the only conditioning a
    guidance-distilled Flux has. Its steps are the scheduler's timesteps below the pass's start.
    """
    scheduler = pipeline.scheduler
    flow = hasattr(scheduler, "scale_noise")
    noising = "scale_noise" if flow else "add_noise"
    if not flow and not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"inversion needs a noise-prediction scheduler with alphas_cumprod or a flow-matching one; "
                         f"{type(scheduler).__name__} is neither")
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if not flow and prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"inversion reads epsilon or v predictions, the scheduler predicts {prediction!r}")
    divisor = _TIMESTEP_DIVISOR.get(family, 1.0)
    # pending: from the pass's noising to its first scheduler step; start: (model input, scheduler latent).
    state = {"pending": False, "start": None, "busy": False}

    def predict(args, kwargs, x: torch.Tensor, scheduler_t: float, half: int) -> torch.Tensor:
        sample = _sample_of(args, kwargs)
        inputs = x.repeat(sample.shape[0] // x.shape[0], *[1] * (x.ndim - 1))
        call_args, call_kwargs = _with(args, kwargs, inputs, _as_timestep(_timestep_of(args, kwargs), scheduler_t / divisor))
        out = denoiser(*call_args, **call_kwargs)
        out = out[0] if isinstance(out, tuple) else out.sample
        return out[-half:]

    def invert(args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        sample = _sample_of(args, kwargs)
        t_start = float(torch.as_tensor(_timestep_of(args, kwargs)).flatten()[0]) * divisor
        # The pipeline's latent is the clean one (its noising is the identity here), scaled for the
        # model as the scheduler scales its input: Euler's 1/sqrt(σ²+1), 1 for DDIM and flow matching.
        scale_input = getattr(scheduler, "scale_model_input", None)
        ones = torch.ones_like(sample[:1])
        scale = ones if scale_input is None else scale_input(ones, torch.tensor(t_start))
        # A guided batch is [unconditional; conditional]: the conditional half is read.
        half = sample.shape[0] // 2 if sample.shape[0] % 2 == 0 and _guided(pipeline) else sample.shape[0]
        x = sample[-half:] / scale
        timesteps = [float(t) for t in scheduler.timesteps]
        first = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t_start))
        path = timesteps[first + 1:][::-1] + [timesteps[first]]
        if flow:
            total = float(scheduler.config.num_train_timesteps)
            sigma = 0.0
            for t in path:
                velocity = predict(args, kwargs, x, sigma * total, half)
                x = x + (t / total - sigma) * velocity
                sigma = t / total
        else:
            alphas = scheduler.alphas_cumprod.to(x.device, torch.float32)
            level = torch.tensor(1.0, device=x.device)
            for t in path:
                out = predict(args, kwargs, x, t, half).float()
                if prediction == "v_prediction":
                    eps = level.sqrt() * out + (1 - level).sqrt() * x
                    clean = level.sqrt() * x - (1 - level).sqrt() * out
                else:
                    eps = out
                    clean = (x - (1 - level).sqrt() * eps) / level.sqrt()
                level = alphas[int(round(t))]
                x = (level.sqrt() * clean + (1 - level).sqrt() * eps).to(sample.dtype)
        # The model reads the inverted latent as it is; the scheduler keeps it unscaled (Euler).
        return x, x / scale

    def pre_hook(module, args, kwargs):
        if state["busy"] or not state["pending"]:
            return None
        if state["start"] is None:
            weights, store.token_weights = store.token_weights, None
            state["busy"] = True
            try:
                state["start"] = invert(args, kwargs)
            finally:
                state["busy"] = False
                store.token_weights = weights
        model_input, _ = state["start"]
        sample = _sample_of(args, kwargs)
        replaced = model_input.repeat(sample.shape[0] // model_input.shape[0], *[1] * (sample.ndim - 1))
        return _with(args, kwargs, replaced, _timestep_of(args, kwargs))

    original_step = scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        if state["pending"] and state["start"] is not None:
            sample = state["start"][1]
            state["pending"], state["start"] = False, None
        return original_step(model_output, timestep, sample, *args, **kwargs)

    def clean_latent(clean, *args, **kwargs):
        state["pending"], state["start"] = True, None
        return clean

    setattr(scheduler, noising, clean_latent)
    scheduler.step = step
    handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        del scheduler.step
        delattr(scheduler, noising)


def _guided(pipeline) -> bool:
    return bool(getattr(pipeline, "do_classifier_free_guidance", False))
