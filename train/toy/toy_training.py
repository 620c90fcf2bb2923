"""What the toy-model trainers (and the MM-DiT probe) share: the ToyWorld training set, the
token-localisation loss, the preset an export writes, and SD3's joint-attention math.

A module, not a script: ``train_toy_model.py``, ``train_toy_mmdit.py`` and ``probe_toy_mmdit.py``
import it from their own folder (a script's folder is first on its import path).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ondemand_seg.pipelines.builtin import PRESET_FILE
from ondemand_seg.settings.resolve import resolve_config
from ondemand_seg.toyworld import TOY_CLASSES, ToyWorld

# The tokenizer's words: the captions' ("a photo of a triangle, a cross and a circle").
WORDS = ("a", "photo", "of", "and") + TOY_CLASSES[1:]
MAX_SLOTS = 3  # class words per caption (ToyWorld draws at most 3 objects)


def make_data(args, tokenizer) -> dict:
    """Render (and cache) the ToyWorld training set: images, id masks, token ids, class slots."""
    cache = args.out / "data.npz"
    if cache.exists():
        return dict(np.load(cache))
    single = ToyWorld(args.image_size, seed=args.seed, min_objects=1, max_objects=1)
    multi = ToyWorld(args.image_size, seed=args.seed + 1, min_objects=1, max_objects=args.max_objects)
    n = args.num_samples
    images = np.zeros((n, args.image_size, args.image_size, 3), np.uint8)
    masks = np.zeros((n, args.image_size, args.image_size), np.uint8)
    ids = np.zeros((n, tokenizer.model_max_length), np.int64)
    slot_pos = np.zeros((n, MAX_SLOTS), np.int64)
    slot_cls = np.zeros((n, MAX_SLOTS), np.int64)  # 0 = unused slot
    class_tok = {c: tokenizer.convert_tokens_to_ids(c + "</w>") for c in TOY_CLASSES[1:]}
    rng = np.random.default_rng(args.seed)
    for i in range(n):
        world = single if rng.random() < args.single_fraction else multi
        s = world.sample(i)
        images[i], masks[i] = s.image, s.mask
        enc = tokenizer(s.caption, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True)["input_ids"]
        ids[i] = enc
        for k, name in enumerate(s.class_names):
            positions = [j for j, t in enumerate(enc) if t == class_tok[name]]
            assert len(positions) == 1, (s.caption, enc)
            slot_pos[i, k], slot_cls[i, k] = positions[0], TOY_CLASSES.index(name)
    data = dict(images=images, masks=masks, ids=ids, slot_pos=slot_pos, slot_cls=slot_cls)
    np.savez(cache, **data)
    return data


def to_tensor_images(images: np.ndarray) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 images as ``[B, 3, H, W]`` float in [-1, 1] (what the VAE takes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def localisation_loss(records, slot_pos, slot_masks_full, gate, latent_hw, factors):
    """Mean BCE between class-token attention and the class's visible-mask coverage per cell.

    slot_pos: [B, K] token index per slot; slot_masks_full: [B, K, H, W] float (0 for unused
    slots); gate: [B, K] 1 where the slot counts (a named class, caption kept, t in range)."""
    total, count = 0.0, 0
    cache = {}
    for probs in records:
        b, n, t = probs.shape
        factor = int(round(math.sqrt(latent_hw[0] * latent_hw[1] / n)))
        if factor not in factors:
            continue
        if factor not in cache:
            h, w = latent_hw[0] // factor, latent_hw[1] // factor
            cache[factor] = F.adaptive_avg_pool2d(slot_masks_full, (h, w)).flatten(2)  # [B, K, N]
        target = cache[factor]
        p = probs.gather(2, slot_pos[:, None, :].expand(b, n, slot_pos.shape[1])).transpose(1, 2)
        bce = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), target, reduction="none").mean(-1)
        total = total + (bce * gate).sum() / gate.sum().clamp_min(1.0)
        count += 1
    return total / max(count, 1)


def write_preset(folder: Path, preset: dict) -> None:
    """Write ``preset`` as ``folder/ondemand_seg.json`` and check that the library resolves it."""
    (folder / PRESET_FILE).write_text(json.dumps(preset, indent=4) + "\n")
    try:
        resolve_config(folder)
    except ValueError as error:
        raise SystemExit(f"the preset written to {folder / PRESET_FILE} does not resolve: {error}") from None


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """q, k, v ``[B, heads, N_image + T, d]`` of SD3's joint attention, image tokens first, built as
    diffusers' ``JointAttnProcessor2_0`` (0.42) builds them: re-check when that processor changes."""
    b, h = hidden_states.shape[0], attn.heads
    d = attn.to_q.out_features // h

    def split(x):
        return x.view(b, -1, h, d).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    cq, ck, cv = (split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states)),
                  split(attn.add_v_proj(encoder_hidden_states)))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)


def joint_output(attn, out: torch.Tensor, images: int):
    """The layer's (image, text) outputs from the ``[B, heads, N_image + T, d]`` attention output."""
    out = out.transpose(1, 2).flatten(2)
    image, context = out[:, :images], out[:, images:]
    if not attn.context_pre_only:
        context = attn.to_add_out(context)
    return attn.to_out[1](attn.to_out[0](image)), context
