"""Text-attention capture through diffusers' attention-processor API.

``install_capture(denoiser, store, family)`` swaps a capture processor in on every layer where
image queries meet the text: cross-attention layers (SD 1.x/2.x, SDXL, PixArt, Sana) and joint
attention layers (SD3's MM-DiT blocks, Flux's double- and single-stream blocks). Every other
layer keeps its own processor (Sana's linear attention, SD3.5's image-only ``attn2``). The capture
processors keep the fused attention path for the layer's output and, only on the steps the store
wants, compute the class tokens' share of each image query's attention for the conditional part
of the batch and add it to a running sum: memory does not grow with layers or steps.

Two kinds of map (``map_source``): ``"attention"``, the softmax probability mass on the class
tokens, and, for joint attention, ``"output"``, ConceptAttention's output-space map (Helbling et
al., ICML 2025): image tokens' attention outputs compared with the class tokens' own attention
outputs. For joint attention, ``joint_softmax`` says whether the mass is taken under the model's
softmax over all keys (image and text) or renormalised over the text keys.

Two options cost more than the head-averaged sums (``MaskConfig.aggregation`` and
``token_rescaling``): ``per_head`` keeps one running sum per layer and head instead of one per
resolution (``heads × layers`` times the maps, still constant in steps), and a ``rescaling`` other
than ``"none"`` computes every text token's mass at each recorded call (a ``[B, heads, N, T]``
tensor that lives for that call only) to rescale the class maps before they are summed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..masks.attention import CapturedAttention
from ..masks.maps import rescale_token_mass
from ..pipelines.families import Family

# How :func:`class_mass` computes the class tokens' share (``GeneratorConfig.capture_kernel``).
CLASS_MASS_KERNELS = ("auto", "sdpa", "explicit")


class AttentionStore:
    """Running sums of what the capture records for one generation batch: per-resolution
    class-token maps (from cross or joint attention) and, for refinement, self-attention at one
    resolution. Memory does not grow with layers or steps.

    Call :meth:`begin` before a pipeline call; pass :meth:`on_step_end` as the pipeline's
    ``callback_on_step_end`` so the store knows the denoising step; read :meth:`captured` after.
    ``kernel`` is how the class-token mass is computed (:func:`class_mass`). ``per_head`` also keeps
    one running sum per layer and head (``MaskConfig.aggregation``); ``rescaling`` is the per-pixel
    token rescaling applied to each recorded call's maps (``MaskConfig.token_rescaling``).
    """

    def __init__(self, map_source: str = "attention", joint_softmax: str = "all", kernel: str = "auto",
                 per_head: bool = False, rescaling: str = "none") -> None:
        if kernel not in CLASS_MASS_KERNELS:
            raise ValueError(f"class-mass kernel must be one of {CLASS_MASS_KERNELS}, got {kernel!r}")
        self.map_source = map_source
        self.joint_softmax = joint_softmax
        self.kernel = kernel
        self.per_head = per_head
        self.rescaling = rescaling
        self._sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        # Per layer (the capture processor's index): its factor and its [B, K, heads, N] running sum.
        self._head_sums: dict[int, tuple[int, torch.Tensor]] = {}
        self.head_counts: dict[int, int] = {}
        self.self_attention_factor: int | None = None
        self._self_sum: torch.Tensor | None = None
        self.self_count = 0
        # Latent factors at which self-attention layers ran, so a missing factor can be explained.
        self.self_attention_factors_seen: set[int] = set()
        self.token_weights: torch.Tensor | None = None
        self.latent_size: tuple[int, int] = (0, 0)
        self.step = 0
        self._first_step = 0
        self._end_step = 0

    def begin(
        self,
        token_weights: torch.Tensor,
        latent_size: tuple[int, int],
        num_steps: int,
        timestep_window: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Start a batch.

        Args:
            token_weights: ``[B, K, T]`` 1 where text token ``t`` names class slot ``k``.
            latent_size: ``(h, w)`` of the latent the UNet denoises.
            num_steps: denoising steps of the coming call.
            timestep_window: fraction ``(start, end)`` of the steps to record, in sampling order.
        """
        self.reset()
        self.token_weights = token_weights
        self.latent_size = tuple(latent_size)
        self.step = 0
        self._first_step = min(int(math.floor(timestep_window[0] * num_steps)), num_steps - 1)
        self._end_step = max(int(math.ceil(timestep_window[1] * num_steps)), self._first_step + 1)

    def reset(self) -> None:
        """Drop the batch's sums and stop recording until the next :meth:`begin`."""
        self._sums.clear()
        self.counts.clear()
        self._head_sums.clear()
        self.head_counts.clear()
        self.token_weights = None
        self._self_sum = None
        self.self_count = 0

    @property
    def recording(self) -> bool:
        return self.token_weights is not None and self._first_step <= self.step < self._end_step

    def on_step(self, step: int) -> None:
        """Denoising step ``step`` has ended: the next denoiser call is step ``step + 1``."""
        self.step = step + 1

    def on_step_end(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` hook (see :meth:`on_step`)."""
        self.on_step(step)
        return callback_kwargs

    @property
    def text_length(self) -> int:
        return self.token_weights.shape[-1]

    def conditional(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The images' own rows of denoiser-batch tensors.

        With classifier-free guidance run as one batch the denoiser sees ``[unconditional;
        conditional]`` (SD, SDXL, SD3, PixArt, Sana): the last ``B`` rows are kept. Without it
        (guidance-distilled Flux, guidance 1) the batch is the ``B`` images themselves.
        """
        images = self.token_weights.shape[0]
        if tensors[0].shape[0] not in (images, 2 * images):
            raise RuntimeError(
                f"capture expected a denoiser batch of {images} or {2 * images}, got {tensors[0].shape[0]}; "
                "generate with num_images_per_prompt=1"
            )
        return [t[-images:] for t in tensors]

    def check_text_length(self, length: int) -> None:
        if length != self.text_length:
            raise RuntimeError(
                f"the denoiser received {length} text tokens but the class-token positions were computed for "
                f"{self.text_length}; the pipeline's text encoding differs from what the capture assumes"
            )

    def factor_of(self, num_queries: int) -> int:
        """The latent downsampling factor of an attention layer with ``num_queries`` positions."""
        h, w = self.latent_size
        factor = 1
        while factor <= max(h, w):
            if math.ceil(h / factor) * math.ceil(w / factor) == num_queries:
                return factor
            factor *= 2
        raise ValueError(f"{num_queries} attention queries match no downsampling of the {h}x{w} latent")

    def add(self, class_maps: torch.Tensor, layer: int | None = None) -> None:
        """Accumulate one layer's class attention at one step: ``[B, K, N]`` head-averaged, or with
        ``per_head`` ``[B, K, heads, N]`` and the layer's index (kept per layer and head, and
        averaged over heads into the resolution's sum)."""
        factor = self.factor_of(class_maps.shape[-1])
        class_maps = class_maps.float()
        if self.per_head:
            if class_maps.dim() != 4 or layer is None:
                raise ValueError("a per-head store takes [B, K, heads, N] maps with their layer's index")
            if layer in self._head_sums:
                self._head_sums[layer][1].add_(class_maps)
                self.head_counts[layer] += 1
            else:
                self._head_sums[layer] = (factor, class_maps.clone())
                self.head_counts[layer] = 1
            class_maps = class_maps.mean(2)
        if factor in self._sums:
            self._sums[factor] += class_maps
            self.counts[factor] += 1
        else:
            self._sums[factor] = class_maps.clone()
            self.counts[factor] = 1

    def wants_self_attention(self, num_queries: int) -> bool:
        """Whether a self-attention layer with ``num_queries`` positions should be recorded now."""
        if self.self_attention_factor is None or not self.recording:
            return False
        factor = self.factor_of(num_queries)
        self.self_attention_factors_seen.add(factor)
        return factor == self.self_attention_factor

    def add_self(self, probs: torch.Tensor) -> None:
        """Accumulate ``[B, N, N]`` head-averaged self-attention of one layer at one step."""
        probs = probs.float()
        self._self_sum = probs.clone() if self._self_sum is None else self._self_sum + probs
        self.self_count += 1

    def self_attention(self) -> torch.Tensor | None:
        """Mean recorded self-attention ``[B, N, N]`` (rows sum to 1), or ``None``."""
        return None if self._self_sum is None else self._self_sum / self.self_count

    def maps(self) -> dict[int, torch.Tensor]:
        """Mean attention per factor: ``{factor: [B, K, ceil(h/factor), ceil(w/factor)]}``."""
        h, w = self.latent_size
        return {
            f: (s / self.counts[f]).view(*s.shape[:2], math.ceil(h / f), math.ceil(w / f))
            for f, s in self._sums.items()
        }

    def head_maps(self) -> dict[int, torch.Tensor] | None:
        """With ``per_head``, the mean map of every layer-head per factor: ``{factor: [B, K, M, h, w]}``
        (``M`` heads of that factor's layers, layers in their processors' order); else ``None``."""
        if not self.per_head:
            return None
        h, w = self.latent_size
        by_factor: dict[int, list[torch.Tensor]] = {}
        for layer in sorted(self._head_sums):
            factor, total = self._head_sums[layer]
            by_factor.setdefault(factor, []).append(total / self.head_counts[layer])
        return {f: torch.cat(parts, 2).view(*parts[0].shape[:2], -1, math.ceil(h / f), math.ceil(w / f))
                for f, parts in by_factor.items()}

    def captured(self) -> CapturedAttention:
        """The batch's recorded attention, detached from the store (read before :meth:`reset`)."""
        return CapturedAttention(self.maps(), self.self_attention(), self.self_attention_factor,
                                 set(self.self_attention_factors_seen), self.latent_size, self.head_maps())

    def memory_bytes(self) -> int:
        """Bytes held by the running sums (constant in the number of steps)."""
        tensors = list(self._sums.values()) + [total for _, total in self._head_sums.values()]
        tensors += [self._self_sum] if self._self_sum is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def record(self, query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None, layer: int | None = None, kernel: str | None = None,
               text: slice | None = None) -> None:
        """Add one layer's class maps from its conditional queries and keys (:func:`class_mass`, or
        with a rescaling :func:`token_mass` and :func:`~ondemand_seg.masks.maps.rescale_token_mass`).

        ``weights`` are ``[B, K, M]`` over the keys; ``text`` (rescaling only): where the text keys
        sit among the keys, default all of them.
        """
        kernel = self.kernel if kernel is None else kernel
        if self.rescaling == "none":
            maps = class_mass(query, key, weights, scale, mask, kernel, per_head=self.per_head)
        else:
            text = slice(0, key.shape[2]) if text is None else text
            mass = token_mass(query, key, scale, mask, kernel, text)  # [B, heads, N, T]
            maps = rescale_token_mass(mass, weights[:, :, text], self.rescaling).transpose(1, 2)  # [B, K, heads, N]
            maps = maps if self.per_head else maps.mean(2)
        # The layer index only where the store keeps layers apart: add(maps) is the head-averaged call.
        if self.per_head:
            self.add(maps, layer)
        else:
            self.add(maps)


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``[..., N, M]`` scaled scores q·kᵀ in float32, from ``[..., N, D]`` queries and ``[..., M, D]`` keys.

    Always float32, whatever the model's dtype: in float16, q·kᵀ can pass 65504 (then inf, and the
    softmax NaN) on layers whose own output stays finite, because diffusers upcasts such scores
    (``Attention.upcast_attention``, set by SD 2.x) and the fused kernel keeps them in float32.
    """
    return torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale


def class_mass(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None, kernel: str = "auto", per_head: bool = False) -> torch.Tensor:
    """``[B, K, N]`` float32 head-averaged softmax mass on each class's keys: mean over heads of
    ``softmax(q·kᵀ·scale + mask)·Wᵀ`` (``per_head``: ``[B, K, heads, N]``, each head's).

    Args:
        query: ``[B, heads, N, D]``; key: ``[B, heads, M, D]``; weights: ``[B, K, M]``, 1 where key
            ``m`` belongs to class ``k``; mask: additive float mask broadcastable to
            ``[B, heads, N, M]`` (diffusers' text masks), or ``None``.
        kernel: ``"explicit"`` builds the ``[B, heads, N, M]`` scores in float32 and takes their
            softmax; ``"sdpa"`` hands the weights to ``F.scaled_dot_product_attention`` as values
            (in the model's dtype on CUDA, float32 elsewhere): on CUDA a fused kernel, with no
            score tensor in memory; ``"auto"`` is ``"sdpa"`` on CUDA and ``"explicit"`` elsewhere.
    """
    if kernel not in CLASS_MASS_KERNELS:
        raise ValueError(f"class-mass kernel must be one of {CLASS_MASS_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        # On CPU, SDPA runs a value width of K (not D) on its unfused math path, slower than the
        # explicit softmax; on CUDA a fused kernel needs no score tensor in memory.
        kernel = "sdpa" if query.is_cuda else "explicit"
    classes = weights.shape[1]
    if kernel == "explicit":
        scores = _scores(query, key, scale)
        if mask is not None:
            scores = scores + mask.float()
        mass = torch.matmul(scores.softmax(dim=-1), weights.float().transpose(1, 2)[:, None])  # [B, heads, N, K]
        return mass.permute(0, 3, 1, 2) if per_head else mass.mean(1).transpose(1, 2)
    # On CUDA, no float32 upcast: the fused kernels (memory-efficient, cuDNN) keep q·kᵀ and the
    # softmax in float32 accumulators, so a float16 model's scores cannot overflow, and only the
    # returned mass is rounded to the model's dtype. Elsewhere SDPA's math path would upcast
    # float16 inputs anyway, so float32 costs nothing and keeps the mass in float32.
    if not query.is_cuda:
        query, key = query.float(), key.float()
    # The memory-efficient and cuDNN kernels take a value width unlike the head dimension only when
    # it is a multiple of 8 (flash needs them equal), so the K class columns are padded with zeros.
    values = F.pad(weights.transpose(1, 2).to(query.dtype), (0, -classes % 8))  # [B, M, K + pad]
    values = values[:, None].expand(-1, query.shape[1], -1, -1).contiguous()
    if mask is not None:
        mask = mask.to(query.dtype)
    mass = F.scaled_dot_product_attention(query, key, values, attn_mask=mask, scale=scale)[..., :classes]
    return mass.float().permute(0, 3, 1, 2) if per_head else mass.float().mean(1).transpose(1, 2)


def token_mass(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
               kernel: str = "auto", text: slice | None = None) -> torch.Tensor:
    """``[B, heads, N, T]`` float32 softmax mass of each query on each of the ``T`` text keys
    ``text`` (default: every key), the softmax over all keys, for per-pixel token rescaling.

    Shapes and ``kernel`` as in :func:`class_mass`, whose SDPA path this is with one value column
    per text key (``T`` columns instead of ``K``).
    """
    text = slice(0, key.shape[2]) if text is None else text
    tokens = len(range(*text.indices(key.shape[2])))
    identity = torch.zeros(query.shape[0], tokens, key.shape[2], device=query.device)
    identity[:, :, text] = torch.eye(tokens, device=query.device)
    return class_mass(query, key, identity, scale, mask, kernel, per_head=True).permute(0, 2, 3, 1)


class CaptureProcessor:
    """What the capture processors share: the store they feed and the processor they replaced.

    A call the store records nothing from (a step outside the timestep window, a self-attention
    layer at another resolution) is handed to the replaced processor as it is, so those steps run
    the model's own attention code at its own speed; only recording calls take the capture's path,
    which re-implements the layer to read its queries and keys. Each subclass keeps the exact call
    signature of the processor it was adapted from: diffusers passes a processor only the keyword
    arguments its ``__call__`` names.
    """

    def __init__(self, store: AttentionStore, replaced=None, layer: int | None = None) -> None:
        self.store = store
        self.replaced = replaced
        # Which text-attention layer this is (installation order), for per-head sums.
        self.layer = layer


class CrossAttentionCaptureProcessor(CaptureProcessor):
    """Capture for cross-attention layers (class-token probabilities) and, for self-attention
    refinement, self-attention layers (their probabilities at one resolution).

    Adapted from diffusers' ``AttnProcessor2_0`` (0.42): re-check when that processor changes.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if self.replaced is not None and not self._records(attn, hidden_states):
            # temb only where it was given: processors of layers without a spatial norm do not take it.
            extra = {} if temb is None else {"temb": temb}
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attn.is_cross_attention:
            if self.store.recording:
                self._record(attn, query, key, attention_mask)
        elif self.store.wants_self_attention(query.shape[2]):
            self._record_self(attn, query, key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _records(self, attn: Attention, hidden_states: torch.Tensor) -> bool:
        if attn.is_cross_attention:
            return self.store.recording
        queries = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        return self.store.wants_self_attention(queries)

    def _record(self, attn: Attention, query, key, attention_mask) -> None:
        self.store.check_text_length(key.shape[2])
        query, key = self.store.conditional(query, key)
        mask = None if attention_mask is None else self.store.conditional(attention_mask)[0]
        self.store.record(query, key, self.store.token_weights, attn.scale, mask, self.layer)

    def _record_self(self, attn: Attention, query, key) -> None:
        query, key = self.store.conditional(query, key)
        probs = _scores(query, key, attn.scale).softmax(dim=-1)
        self.store.add_self(probs.mean(1))


def record_joint(store: AttentionStore, scale: float, query: torch.Tensor, key: torch.Tensor,
                 output: torch.Tensor, text: slice, image: slice, layer: int | None = None) -> None:
    """Record one joint-attention layer's class maps (and self-attention, when wanted).

    Args:
        query, key: ``[batch, heads, S, D]`` after normalisation and rotary embedding, ``S`` the
            joint image + text sequence; output: the layer's ``[batch, heads, S, D]`` attention
            output before its projection; text, image: where each part sits in the sequence;
            layer: the layer's index (per-head sums).
    """
    store.check_text_length(text.stop - text.start)
    query, key, output = store.conditional(query, key, output)
    weights = store.token_weights
    q_image = query[:, :, image]
    if store.map_source == "output":
        # ConceptAttention, with the prompt's own tokens as the concepts: each image token's
        # attention output is compared with every text token's, and the class tokens' share of
        # the softmax over text tokens is the map (no extra concept tokens are run).
        store.record(output[:, :, image], output[:, :, text], weights, scale, layer=layer)
    elif store.joint_softmax == "text":
        store.record(q_image, key[:, :, text], weights, scale, layer=layer)
    else:
        # The model's own softmax runs over every key, image keys included: always the SDPA kernel,
        # which on CUDA needs no [N, N + T] score tensor (the explicit kernel always writes one).
        indicator = weights.new_zeros(*weights.shape[:2], key.shape[2])
        indicator[:, :, text] = weights
        store.record(q_image, key, indicator, scale, layer=layer, kernel="sdpa", text=text)
    if store.wants_self_attention(q_image.shape[2]):
        probs = _scores(q_image, key[:, :, image], scale).softmax(dim=-1)
        store.add_self(probs.mean(1))


class JointAttentionCaptureProcessor(CaptureProcessor):
    """SD3's joint attention (image tokens first, then text) with capture.

    Adapted from diffusers' ``JointAttnProcessor2_0`` (0.42): re-check when that processor changes.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if self.replaced is not None and (encoder_hidden_states is None or not self.store.recording):
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context = [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states)]
            context = [t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in context]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query = torch.cat([query, context[0]], dim=2)
            key = torch.cat([key, context[1]], dim=2)
            value = torch.cat([value, context[2]], dim=2)

        output = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        if encoder_hidden_states is not None and self.store.recording:
            images = residual.shape[1]
            record_joint(self.store, attn.scale, query, key, output, slice(images, key.shape[2]), slice(0, images),
                         self.layer)
        hidden_states = output.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAttentionCaptureProcessor(CaptureProcessor):
    """Flux's attention (text tokens first) with capture, in double-stream blocks (separate text
    and image inputs) and single-stream blocks (one sequence whose first ``T`` tokens are text).

    Adapted from diffusers' ``FluxAttnProcessor`` (0.42): re-check when that processor changes.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if self.replaced is not None and not self.store.recording:
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        output = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)  # [batch, S, heads, D]
        if self.store.recording:
            texts = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.store.text_length
            record_joint(self.store, attn.head_dim**-0.5, query.transpose(1, 2), key.transpose(1, 2),
                         output.transpose(1, 2), slice(0, texts), slice(texts, query.shape[1]), self.layer)
        hidden_states = output.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _reads_text(module, family: Family) -> bool:
    if family.name == "flux":
        return type(module).__name__ == "FluxAttention"
    if family.attention == "joint":
        return getattr(module, "added_kv_proj_dim", None) is not None
    return bool(getattr(module, "is_cross_attention", False))


def install_capture(denoiser: torch.nn.Module, store: AttentionStore, family: Family,
                    self_attention: bool = False) -> list[str]:
    """Route ``denoiser``'s text-attention layers through the family's capture processor.

    Every other layer keeps its processor, except that with ``self_attention`` (refinement on) a
    cross-attention family's softmax self-attention layers run the capture processor too, which
    records only at the store's ``self_attention_factor`` and stays on the fused path elsewhere.
    Installing twice replaces the first installation.
    Returns:
        The processor names of the capturing layers.
    """
    capture = {"flux": FluxAttentionCaptureProcessor}.get(
        family.name, JointAttentionCaptureProcessor if family.attention == "joint" else CrossAttentionCaptureProcessor)
    processors, captured, self_layers = {}, [], 0
    for name, current in denoiser.attn_processors.items():
        if isinstance(current, CaptureProcessor):
            current = current.replaced
        module = denoiser.get_submodule(name[: -len(".processor")])
        if _reads_text(module, family):
            processors[name] = capture(store, current, len(captured))
            captured.append(name)
        elif self_attention and family.attention == "cross" and family.self_attention and isinstance(module, Attention):
            processors[name] = CrossAttentionCaptureProcessor(store, current)
            self_layers += 1
        else:
            processors[name] = current
    if not captured:
        raise ValueError(f"this {type(denoiser).__name__} has no layer where image queries attend to text, "
                         "so there is no text attention to capture")
    if self_attention and family.attention == "cross" and not self_layers:
        # e.g. ``only_cross_attention=True`` (the embedded toy model): every attention reads the text.
        raise ValueError("self-attention refinement needs self-attention layers, and this model has none "
                         "(all its attention layers are cross-attention); set self_attention_factor=None")
    denoiser.set_attn_processor(processors)
    return captured
