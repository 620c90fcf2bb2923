"""Cross-attention capture through diffusers' attention-processor API.

``install_capture(unet, store)`` swaps in :class:`CrossAttentionCaptureProcessor` on every
cross-attention layer and the stock fused processor on every self-attention layer. The capture
processor keeps the fused ``scaled_dot_product_attention`` path for its output and, only on the
steps the store wants, computes the softmax for the class tokens of the conditional half of the
batch and adds it to a running sum: memory does not grow with layers or steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass
class CapturedAttention:
    """What one generation batch recorded, for :func:`~ondemand_seg.labelling.masks_from_attention`.

    maps: ``{latent factor: [B, K, h_f, w_f]}`` mean class-token attention per resolution;
    self_attention: ``[B, N, N]`` mean self-attention at ``self_attention_factor`` (rows sum to 1),
    or ``None``; self_attention_factors_seen: the factors at which self-attention layers ran;
    latent_size: ``(h, w)`` of the denoised latent.
    """

    maps: dict[int, torch.Tensor]
    self_attention: torch.Tensor | None
    self_attention_factor: int | None
    self_attention_factors_seen: set[int]
    latent_size: tuple[int, int]


class CrossAttentionStore:
    """Running per-resolution sums of class-token cross-attention for one generation batch.

    Call :meth:`begin` before a pipeline call; pass :meth:`on_step_end` as the pipeline's
    ``callback_on_step_end`` so the store knows the denoising step; read :meth:`maps` after.
    """

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
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
        self.token_weights = None
        self._self_sum = None
        self.self_count = 0

    @property
    def recording(self) -> bool:
        return self.token_weights is not None and self._first_step <= self.step < self._end_step

    def on_step_end(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` hook: the next UNet call is step ``step + 1``."""
        self.step = step + 1
        return callback_kwargs

    def factor_of(self, num_queries: int) -> int:
        """The latent downsampling factor of an attention layer with ``num_queries`` positions."""
        h, w = self.latent_size
        factor = 1
        while factor <= max(h, w):
            if math.ceil(h / factor) * math.ceil(w / factor) == num_queries:
                return factor
            factor *= 2
        raise ValueError(f"{num_queries} attention queries match no downsampling of the {h}x{w} latent")

    def add(self, class_maps: torch.Tensor) -> None:
        """Accumulate ``[B, K, N]`` head-averaged class attention of one layer at one step."""
        factor = self.factor_of(class_maps.shape[-1])
        class_maps = class_maps.float()
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

    def captured(self) -> CapturedAttention:
        """The batch's recorded attention, detached from the store (read before :meth:`reset`)."""
        return CapturedAttention(self.maps(), self.self_attention(), self.self_attention_factor,
                                 set(self.self_attention_factors_seen), self.latent_size)

    def memory_bytes(self) -> int:
        """Bytes held by the running sums (constant in the number of steps)."""
        tensors = list(self._sums.values()) + ([self._self_sum] if self._self_sum is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class CrossAttentionCaptureProcessor:
    """Attention processor that feeds a :class:`CrossAttentionStore`: class-token probabilities of
    cross-attention layers and, for self-attention refinement, self-attention at one resolution."""

    def __init__(self, store: CrossAttentionStore) -> None:
        self.store = store

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

    def _record(self, attn: Attention, query, key, attention_mask) -> None:
        weights = self.store.token_weights
        images = weights.shape[0]
        # With classifier-free guidance the batch is [unconditional; conditional]: keep the second half.
        if query.shape[0] not in (images, 2 * images):
            raise RuntimeError(
                f"capture expected a UNet batch of {images} or {2 * images}, got {query.shape[0]}; "
                "generate with num_images_per_prompt=1"
            )
        query, key = query[-images:], key[-images:]
        # Only the class tokens' probability mass is kept: softmax(q·kᵀ)·Wᵀ. An explicit softmax over
        # the T text tokens beats handing Wᵀ to SDPA as values (SDPA's CPU kernel is slow for a value
        # width of K; see RESULTS.md); the layer's output still takes the fused path.
        scores = torch.matmul(query, key.transpose(-1, -2)).float() * attn.scale  # [B, heads, N, T]
        if attention_mask is not None:
            scores = scores + attention_mask[-images:].float()
        mass = torch.matmul(scores.softmax(dim=-1), weights.to(scores).transpose(1, 2)[:, None])  # [B, heads, N, K]
        self.store.add(mass.mean(1).transpose(1, 2))

    def _record_self(self, attn: Attention, query, key) -> None:
        images = self.store.token_weights.shape[0]
        query, key = query[-images:], key[-images:]
        probs = (torch.matmul(query, key.transpose(-1, -2)).float() * attn.scale).softmax(dim=-1)
        self.store.add_self(probs.mean(1))


def install_capture(unet: torch.nn.Module, store: CrossAttentionStore, self_attention: bool = False) -> list[str]:
    """Route ``unet``'s cross-attention layers through the capture processor.

    Self-attention layers get diffusers' fused ``AttnProcessor2_0``, unless ``self_attention``
    (refinement on): then they run the capture processor too, which records only at the store's
    ``self_attention_factor`` and stays on the fused path elsewhere.
    Returns:
        The processor names (``"...attn2.processor"``) of the capturing cross-attention layers.
    """
    processors, captured = {}, []
    for name in unet.attn_processors:
        module = unet.get_submodule(name[: -len(".processor")])
        if getattr(module, "is_cross_attention", False):
            processors[name] = CrossAttentionCaptureProcessor(store)
            captured.append(name)
        elif self_attention:
            processors[name] = CrossAttentionCaptureProcessor(store)
        else:
            processors[name] = AttnProcessor2_0()
    if not captured:
        raise ValueError("this UNet has no cross-attention layers, so there is no text attention to capture")
    if self_attention and len(captured) == len(processors):
        # e.g. ``only_cross_attention=True`` (the embedded toy model): every attention reads the text.
        raise ValueError("self-attention refinement needs self-attention layers, and this UNet has none "
                         "(all its attention layers are cross-attention); set self_attention_factor=None")
    unet.set_attn_processor(processors)
    return captured
