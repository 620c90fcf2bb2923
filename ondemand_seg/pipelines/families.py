"""Model families: which text-to-image pipelines the library captures from, and what each one needs.

One table (:data:`FAMILIES`) says, per family, where the denoiser lives, how the class words reach
it (cross-attention to text tokens, or joint attention over one image + text sequence), and how its
text sequence is built from its tokenizers. :class:`ModelSpec` describes one model from its config
files alone (no weights): the grids its text attention runs at, the image-size multiple, and what
its own pipeline recommends (steps, guidance, image size). The same description is made from a
folder in the main process (early errors) and from a loaded pipeline in a worker (callables,
hub ids), so both paths apply the same defaults and the same checks.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..settings.files import read_json_object
from ..settings.validation import MAX_IMAGE_SIDE


@dataclass(frozen=True)
class Family:
    """A group of pipelines whose text attention is read the same way.

    name: short name used in errors and docs; pipelines: diffusers pipeline class names;
    denoiser: pipeline attribute of the denoising network (``"unet"`` or ``"transformer"``);
    attention: ``"cross"`` (image queries over text keys, SD's ``attn2``) or ``"joint"`` (one
    image + text sequence, MM-DiT); text_first: joint sequence order; gpu_dtype: half precision
    the family is run in on CUDA; self_attention: whether self-attention refinement can be read;
    pixel_multiple: what the pipeline's own ``check_inputs`` requires image sides to be multiples
    of, whatever the VAE (1: only the latent patch, which :attr:`ModelSpec.size_multiple` adds);
    classifier_free: ``guidance_scale`` runs classifier-free guidance (off at <= 1), rather than
    being an embedded guidance input (Flux); flow_matching: whether its schedulers are
    flow-matching ones (``None``: either); may_be_absent: components its pipeline runs without
    when a folder saves them as absent (``[null, null]``), besides the pipeline's optional ones.
    """

    name: str
    title: str
    pipelines: tuple[str, ...]
    denoiser: str
    attention: str
    text_first: bool = False
    gpu_dtype: torch.dtype = torch.float16
    self_attention: bool = True
    pixel_multiple: int = 1
    classifier_free: bool = True
    flow_matching: bool | None = False
    may_be_absent: tuple[str, ...] = ()

    def check_scheduler(self, name: str, where: str) -> None:
        """An error naming ``where`` when the scheduler class ``name`` solves the other kind of
        model: a flow-matching scheduler (``FlowMatch*``) on a noise-predicting one, or the reverse
        (``flow_matching`` ``None``: either, as Sana runs DPM-Solver on flow sigmas)."""
        flow = name.startswith("FlowMatch")
        if self.flow_matching is None or flow == self.flow_matching:
            return
        kind = "a flow-matching" if self.flow_matching else "a noise-predicting (not flow-matching)"
        raise ValueError(f"{where}: {name} cannot drive a {self.title} model, which needs {kind} scheduler")

    @property
    def output_maps(self) -> bool:
        """Output-space (ConceptAttention) maps need text tokens that are also queries: joint only."""
        return self.attention == "joint"


# pixel_multiple is the literal of each pipeline's check_inputs (``height % 8``, Sana's ``% 32``);
# SD3's ``vae_scale_factor * patch_size`` and Flux's ``vae_scale_factor * 2`` are the latent patch.
FAMILIES: tuple[Family, ...] = (
    Family("sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), "unet", "cross", pixel_multiple=8),
    Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), "unet", "cross", pixel_multiple=8),
    # SD3 runs without its T5 encoder (prompts then read by the CLIP encoders alone).
    Family("sd3", "Stable Diffusion 3/3.5", ("StableDiffusion3Pipeline",), "transformer", "joint", flow_matching=True,
           may_be_absent=("text_encoder_3", "tokenizer_3")),
    # Flux is trained in bf16; in fp16 its activations overflow. Its guidance_scale is an input of
    # the guidance-distilled transformer (dev) or unused (schnell), not classifier-free guidance.
    Family("flux", "Flux.1 (dev, schnell)", ("FluxPipeline",), "transformer", "joint", text_first=True,
           gpu_dtype=torch.bfloat16, classifier_free=False, flow_matching=True),
    Family("pixart", "PixArt-α/Σ", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer", "cross",
           pixel_multiple=8),
    # Sana's self-attention is linear (no softmax matrix to read), so no self-attention refinement.
    Family("sana", "Sana", ("SanaPipeline",), "transformer", "cross", gpu_dtype=torch.bfloat16, self_attention=False,
           pixel_multiple=32, flow_matching=None),
)


def supported_pipelines() -> str:
    return ", ".join(f"{f.title} ({'/'.join(f.pipelines)})" for f in FAMILIES)


def family_of(pipeline: str | type) -> Family:
    """The family of a diffusers pipeline class or class name; an error naming the supported ones
    otherwise. A class that subclasses a supported pipeline (users do this) has its base's family."""
    if isinstance(pipeline, type):
        return family_of(supported_base(pipeline))
    for family in FAMILIES:
        if pipeline in family.pipelines:
            return family
    raise ValueError(f"ondemand_seg cannot capture text attention from a {pipeline}; "
                     f"supported pipelines: {supported_pipelines()}")


def supported_base(cls: type) -> str:
    """The name of the first supported diffusers pipeline class among ``cls`` and its bases, else
    ``cls``'s own name (which :func:`family_of` then refuses by name)."""
    supported = {name for family in FAMILIES for name in family.pipelines}
    for base in cls.__mro__:
        if base.__name__ in supported and base.__module__.startswith("diffusers."):
            return base.__name__
    return cls.__name__


# Grids of at least this many cells on the short side are fused by default: DiffuMask fuses SD's
# 64/32/16 maps and leaves out the 8x8 mid-block maps, too coarse for object boundaries.
MIN_DEFAULT_GRID = 16


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, from its configs: family, grids and the pipeline's own recommendations.

    vae_factor: image pixels per latent cell; patch: latent cells per text-attention token side
    (1 for UNets); text_factors: latent downsampling factors at which text attention runs;
    self_factors: factors of readable (softmax) self-attention; default_size: the pipeline's
    default image side; num_inference_steps, guidance_scale: the pipeline's recommendations;
    classifier_free: ``guidance_scale`` runs classifier-free guidance (not for Flux, nor for a UNet
    that takes guidance as an embedding, ``time_cond_proj_dim``: LCM-distilled models);
    train_timesteps: the scheduler's ``num_train_timesteps`` (the most denoising steps it can take).
    """

    family: Family
    pipeline_class: str
    vae_factor: int
    patch: int
    text_factors: tuple[int, ...]
    self_factors: tuple[int, ...]
    default_size: int
    num_inference_steps: int
    guidance_scale: float
    classifier_free: bool = True
    train_timesteps: int | None = None

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: of the pixels per text-attention token, and of what
        the pipeline's ``check_inputs`` requires (8 for SD, SDXL and PixArt whatever the VAE)."""
        return math.lcm(self.vae_factor * self.patch, self.family.pixel_multiple)

    def default_resolution_weights(self, image_size: Sequence[int]) -> dict[int, float]:
        """Equal weights on every text-attention grid with >= :data:`MIN_DEFAULT_GRID` cells on its
        short side at ``image_size``; the finest grid alone when none is that fine."""
        side = min(image_size) / self.vae_factor
        fine = [f for f in self.text_factors if side / f >= MIN_DEFAULT_GRID]
        return {f: 1.0 for f in (fine or [min(self.text_factors)])}

    def defaults(self, image_size: Sequence[int] | None = None) -> dict:
        """The model's settings in preset form: the layer between the library's defaults and a preset."""
        size = tuple(image_size) if image_size is not None else (self.default_size, self.default_size)
        return {
            "image_size": [self.default_size, self.default_size],
            "generator": {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale},
            "mask": {"resolution_weights": self.default_resolution_weights(size)},
        }

    def check_mask(self, mask: Any) -> None:
        """Errors naming what this model has, for mask settings it cannot serve."""
        if mask.resolution_weights is not None:
            missing = sorted(f for f, w in mask.resolution_weights.items() if w > 0 and f not in self.text_factors)
            if missing:
                raise ValueError(
                    f"resolution_weights asks for latent factor(s) {missing}, but this {self.family.title} model's "
                    f"text attention runs at factor(s) {list(self.text_factors)} only"
                )
        if mask.map_source == "output" and not self.family.output_maps:
            raise ValueError(
                f"map_source='output' needs joint attention (text tokens that are also queries: "
                f"{', '.join(f.title for f in FAMILIES if f.output_maps)}); {self.family.title} has cross-attention"
            )
        factor = mask.self_attention_factor
        if factor is not None and factor not in self.self_factors:
            where = f"runs at factor(s) {list(self.self_factors)}" if self.self_factors else "cannot be read"
            raise ValueError(f"self_attention_factor={factor}: this {self.family.title} model's self-attention {where}")

    def check_image_size(self, size: Sequence[int]) -> None:
        bad = [s for s in size if s % self.size_multiple]
        if bad:
            pipeline = self.family.pixel_multiple
            required = f"; {self.pipeline_class} takes multiples of {pipeline}" if pipeline > 1 else ""
            raise ValueError(
                f"image_size {tuple(size)} is not a multiple of {self.size_multiple} on each side (this "
                f"{self.family.title} model has {self.vae_factor} px per latent cell and {self.patch} latent "
                f"cell(s) per attention token{required})"
            )

    def check_generator(self, generator: Any) -> None:
        """An error for a guidance scale that would silently turn this model's guidance off, for
        more steps than the scheduler has timesteps, and for a scheduler of the other kind."""
        steps = generator.num_inference_steps
        if self.train_timesteps is not None and steps is not None and steps > self.train_timesteps:
            raise ValueError(f"num_inference_steps={steps} is more than this model's scheduler has timesteps "
                             f"(num_train_timesteps={self.train_timesteps} in scheduler/scheduler_config.json)")
        if generator.scheduler is not None:
            self.family.check_scheduler(generator.scheduler, "scheduler")
        guidance = generator.guidance_scale
        if guidance is not None and self.classifier_free and guidance <= 1:
            raise ValueError(
                f"guidance_scale={guidance} turns classifier-free guidance off in a {self.pipeline_class} (it "
                f"runs only above 1), so images follow the prompt's classes weakly; give a value > 1 (this "
                f"model's default: {self.guidance_scale})"
            )


ConfigReader = Callable[[str], "dict | None"]


def _unet_factors(config: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Text- and self-attention factors of a ``UNet2DConditionModel`` config."""
    levels = len(config["block_out_channels"])
    text = set()
    for i, block in enumerate(config.get("down_block_types", ())):
        if "CrossAttn" in block:
            text.add(2**i)
    for j, block in enumerate(config.get("up_block_types", ())):
        if "CrossAttn" in block:
            text.add(2 ** (levels - 1 - j))
    if "CrossAttn" in (config.get("mid_block_type") or ""):
        text.add(2 ** (levels - 1))
    only_cross = config.get("only_cross_attention", False)
    if isinstance(only_cross, bool):
        self_factors = set() if only_cross else set(text)
    else:  # per down block; the up blocks mirror it in reverse
        self_factors = {2**i for i, o in enumerate(only_cross) if not o and 2**i in text}
        if not config.get("mid_block_only_cross_attention", only_cross[-1]) and 2 ** (levels - 1) in text:
            self_factors.add(2 ** (levels - 1))
    return tuple(sorted(text)), tuple(sorted(self_factors))


def _vae_factor(config: dict | None) -> int:
    if config is None:
        return 8
    field = "block_out_channels" if "block_out_channels" in config else "encoder_block_out_channels"
    channels = _positive_ints(config.get(field), "vae/config.json", field)
    return 2 ** (len(channels) - 1)


def _positive_ints(value: Any, file: str, field: str) -> list[int]:
    """``value`` when it is a non-empty list of positive ints (channel counts, sizes); an error
    naming the file and field otherwise (the fields the spec is read from)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        what = "is empty" if values == [] else f"must hold positive ints, got {value!r}"
        raise ValueError(f"{file}: {field} {what}")
    return values


def _diffusers_class(name: str) -> type | None:
    """The diffusers class called ``name`` (an attribute lookup: nothing else is imported), or None."""
    import diffusers

    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) else None


def _call_default(pipeline_class: str, name: str) -> Any:
    return inspect.signature(_diffusers_class(pipeline_class).__call__).parameters[name].default


def describe(read: ConfigReader) -> ModelSpec:
    """Describe a model from its config files; ``read(relative path)`` gives a parsed JSON or ``None``.

    Raises:
        ValueError: an unsupported pipeline (naming the supported ones) or a config lacking a field.
    """
    index = read("model_index.json")
    if index is None:
        raise ValueError("model_index.json is missing")
    pipeline_class = index.get("_class_name")
    if not pipeline_class:
        raise ValueError("model_index.json names no pipeline class (_class_name)")
    if not isinstance(pipeline_class, str) or not pipeline_class.isidentifier():
        raise ValueError(f"model_index.json: _class_name must be a diffusers pipeline class name, got {pipeline_class!r}")
    family = family_of(_diffusers_class(pipeline_class) or pipeline_class)
    denoiser = read(f"{family.denoiser}/config.json")
    if denoiser is None:
        raise ValueError(f"{family.denoiser}/config.json is missing (a {pipeline_class} needs a {family.denoiser})")
    vae_factor = _vae_factor(read("vae/config.json"))
    where = f"{family.denoiser}/config.json"
    for field in ("sample_size", "patch_size"):
        if denoiser.get(field) is not None:
            _positive_ints(denoiser[field], where, field)
    if family.denoiser == "unet":
        _positive_ints(denoiser.get("block_out_channels"), where, "block_out_channels")
    try:
        if family.denoiser == "unet":
            text, self_factors = _unet_factors(denoiser)
            patch = 1
            sample_size = denoiser.get("sample_size") or 64
        else:
            # Flux packs 2x2 latent cells into one token in the pipeline, whatever its config says.
            patch = 2 if family.name == "flux" else int(denoiser.get("patch_size") or 1)
            text = (patch,)
            self_factors = (patch,) if family.self_attention else ()
            sample_size = denoiser.get("sample_size") or 128
    except (KeyError, TypeError) as error:
        raise ValueError(f"{family.denoiser}/config.json lacks a field a {pipeline_class} has: {error}") from None
    if isinstance(sample_size, (list, tuple)):
        sample_size = min(sample_size)
    steps = _call_default(pipeline_class, "num_inference_steps")
    guidance = _call_default(pipeline_class, "guidance_scale")
    if family.name == "flux" and not denoiser.get("guidance_embeds", True):
        # A guidance-distilled few-step model (schnell): its card recommends 4 steps and no guidance;
        # FluxPipeline's signature defaults are dev's.
        steps, guidance = 4, 0.0
    # A UNet with a guidance embedding (LCM distillation) takes guidance_scale as an input instead.
    classifier_free = family.classifier_free and denoiser.get("time_cond_proj_dim") is None
    if int(sample_size) * vae_factor > MAX_IMAGE_SIDE:
        raise ValueError(f"{where}: sample_size {sample_size} makes {int(sample_size) * vae_factor} px images, larger "
                         f"than any model generates ({MAX_IMAGE_SIDE} px a side)")
    scheduler = read("scheduler/scheduler_config.json") or {}
    train_timesteps = scheduler.get("num_train_timesteps")
    if train_timesteps is not None:
        _positive_ints(train_timesteps, "scheduler/scheduler_config.json", "num_train_timesteps")
    return ModelSpec(family, pipeline_class, vae_factor, patch, text, self_factors,
                     int(sample_size) * vae_factor, int(steps), float(guidance), classifier_free, train_timesteps)


def folder_reader(path: str | os.PathLike) -> ConfigReader:
    """A :data:`ConfigReader` over a local pipeline folder: ``None`` for a file that is absent, an
    error naming the file for one that is not a regular file, not UTF-8, not JSON or not an object."""
    root = Path(path)

    def read(name: str) -> dict | None:
        file = root / name
        if not file.exists() and not file.is_symlink():
            return None
        return read_json_object(file)

    return read


def cached_hub_reader(repo_id: str) -> ConfigReader | None:
    """A reader over a hub model's configs already in the local Hugging Face cache, without any
    network access; ``None`` when its ``model_index.json`` is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None

    def locate(name: str) -> str | None:
        found = try_to_load_from_cache(repo_id, name)
        return found if isinstance(found, str) else None

    index = locate("model_index.json")
    if index is None:
        return None
    reader = folder_reader(Path(index).parent)
    return lambda name: reader(name) if locate(name) else None


def pipeline_reader(pipeline) -> ConfigReader:
    """A :data:`ConfigReader` over a loaded pipeline's components (so a callable model is described
    exactly as its saved folder would be; a subclass of a supported pipeline as its base)."""
    def read(name: str) -> dict | None:
        if name == "model_index.json":
            return {"_class_name": supported_base(type(pipeline))}
        component = getattr(pipeline, name.split("/")[0], None)
        return None if component is None else dict(component.config)

    return read


def describe_pipeline(pipeline) -> ModelSpec:
    return describe(pipeline_reader(pipeline))


# ------------------------------------------------------------------------------ text sequences
@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's part of the denoiser's text sequence.

    tokenizer: ``None`` for a part that is padding only (SD3 without its T5 encoder); length: the
    part's token count in the denoiser's sequence; lower: the pipeline lower-cases prompts first;
    prefix: text the pipeline puts before the prompt; encoded_length: tokens encoded before the
    pipeline keeps the first and the last ``length - 1`` (Sana with its instruction prefix).
    """

    tokenizer: Any
    length: int
    lower: bool = False
    prefix: str = ""
    encoded_length: int | None = None


def _signature(pipeline) -> dict:
    return inspect.signature(type(pipeline).__call__).parameters


def text_segments(pipeline, family: Family, options: dict) -> list[TextSegment]:
    """The denoiser's text sequence, part by part, for a call with ``options``."""
    max_length = options.get("max_sequence_length")
    if family.name in ("sd", "sdxl"):
        # SDXL's two CLIP encoders share one BPE and their features are concatenated per token, so
        # token positions are the first tokenizer's.
        return [TextSegment(pipeline.tokenizer, pipeline.tokenizer.model_max_length)]
    if family.name == "sd3":
        clip = TextSegment(pipeline.tokenizer, pipeline.tokenizer_max_length)
        return [clip, TextSegment(getattr(pipeline, "tokenizer_3", None), max_length)]
    if family.name == "flux":
        return [TextSegment(pipeline.tokenizer_2, max_length)]
    if family.name == "pixart":
        return [TextSegment(pipeline.tokenizer, max_length, lower=True)]
    if family.name == "sana":
        instruction = options.get("complex_human_instruction")
        if not instruction:
            return [TextSegment(pipeline.tokenizer, max_length, lower=True)]
        prefix = "\n".join(instruction)
        encoded = len(pipeline.tokenizer.encode(prefix)) + max_length - 2
        return [TextSegment(pipeline.tokenizer, max_length, lower=True, prefix=prefix, encoded_length=encoded)]
    raise AssertionError(family.name)


def call_options(pipeline, family: Family) -> dict:
    """Keyword arguments the library passes to this family's pipeline besides the prompt and size.

    Text lengths are passed explicitly (the pipeline's own defaults) so that the token positions
    the capture uses match the sequence the denoiser sees. PixArt and Sana would otherwise snap the
    size to their aspect-ratio bins and resize the image afterwards, which moves the image away
    from the attention grid it was generated on; PixArt's caption cleaning needs optional packages
    and only lower-cases without them, so it is turned off for a reproducible text.
    """
    params = _signature(pipeline)
    options = {}
    if "max_sequence_length" in params:
        options["max_sequence_length"] = params["max_sequence_length"].default
    if "use_resolution_binning" in params:
        options["use_resolution_binning"] = False
    if "clean_caption" in params:
        options["clean_caption"] = False
    if "complex_human_instruction" in params:
        options["complex_human_instruction"] = params["complex_human_instruction"].default
    return options


def step_callback(pipeline, on_step: Callable[[int], None]) -> dict:
    """Keyword arguments that call ``on_step(i)`` after denoising step ``i``: ``callback_on_step_end``
    where the pipeline has it, else the older ``callback``/``callback_steps`` (PixArt)."""
    params = _signature(pipeline)
    if "callback_on_step_end" in params:
        def on_step_end(pipe, step, timestep, callback_kwargs):
            on_step(step)
            return callback_kwargs

        return {"callback_on_step_end": on_step_end}
    if "callback" in params:
        return {"callback": lambda step, timestep, latents: on_step(step), "callback_steps": 1}
    raise ValueError(f"{type(pipeline).__name__} has no step callback, so the capture cannot follow the denoising steps")


def latent_size(spec: ModelSpec, image_size: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` of the latent grid an image of ``image_size`` is denoised on."""
    return tuple(math.ceil(s / spec.vae_factor) for s in image_size)
