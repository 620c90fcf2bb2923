"""Train a tiny MM-DiT in Stable Diffusion 3's layout on ToyWorld (shipped as ``model="toy-mmdit"``).

README
======
The SD3 counterpart of ``train_toy_model.py`` (read its README first: same data, same VAE, same
token-localisation loss). Everything is saved as one diffusers ``StableDiffusion3Pipeline`` folder
(``transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/
model_index.json``, safetensors; ``text_encoder_3``/``tokenizer_3`` are None, SD3 without T5) that
loads with ``DiffusionPipeline.from_pretrained(folder, use_safetensors=True)`` and generates at
32x32:

* VAE: the shipped toy model's trained ``AutoencoderKL`` (``ondemand_seg/models/toy/vae``, factor
  2, 4 latent channels), frozen; exported with ``shift_factor`` 0.0, and latents are computed as
  SD3's pipeline reads them: ``(mode - shift_factor) * scaling_factor``.
* Text encoders: two ``CLIPTextModelWithProjection`` with one transformer layer each, trained
  jointly; one tokenizer (``build_clip_tokenizer``, max_length 16) saved twice. SD3's pipeline
  feeds the transformer ``hidden_states[-2]`` (``clip_skip`` None): with one layer that is the
  token + position embeddings, so no token carries another token's class; the layer only feeds
  the pooled projection (``text_embeds``, the end token's).
* Prompt embeddings exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them: the two
  encoders' ``hidden_states[-2]`` concatenated on features (``joint_attention_dim`` =
  2 x ``--text-dim``, so T5's zero padding of the features is empty), then on the sequence the
  T5 part, which without T5 is zeros ``[B, max_sequence_length (256), joint_attention_dim]``.
  The 256 zero rows stay identical through every block (no position embedding on the text side),
  so training replaces them by one row whose attention logit gets ``+log(256)``: the same
  attention for every query, 273 instead of 528 tokens per joint sequence.
* Transformer: ``SD3Transformer2DModel``, ``patch_size=1`` on the 16x16 latent (joint attention
  sees a 16x16 image grid: latent factor 1), ``--layers`` blocks of ``--heads`` x ``--head-dim``;
  ``caption_projection_dim`` = inner dim, ``pooled_projection_dim`` = 2 x ``--proj-dim``,
  ``pos_embed_max_size`` 16. The last block is ``context_pre_only`` (SD3's layout).
* Diffusion: rectified flow as SD3: ``x_t = (1 - s) x_0 + s * noise``, the transformer predicts
  the velocity ``noise - x_0`` at ``timestep = 1000 s``; training ``s`` uniform in (0, 1)
  (``--timestep-sampling logit_normal`` for SD3's logit-normal), shifted by ``--shift`` like the
  saved ``FlowMatchEulerDiscreteScheduler``. 10% empty captions for classifier-free guidance;
  EMA of transformer and text encoders is what gets saved.

**Extra supervision:** a token-localisation loss as the toy UNet's. In SD3's joint attention
(``JointAttnProcessor2_0``) the sequence is ``[image tokens (256, row-major 16x16), text tokens
(16 CLIP, then the T5 part)]`` for queries and keys alike. A training-only processor records, for
every image query, the head-averaged attention over the *text keys only* (softmax renormalised
over the text part of the joint keys, T5 zeros included), and the probability of each caption class
word's token is pushed towards the class's visible-mask coverage of that query's latent cell
(binary cross-entropy, ``--attn-weight``, ramped in over ``--attn-warmup`` steps; every block).
Text-renormalised rather than over all joint keys: a target of 1 over all keys would make object
queries ignore the image tokens. The saved model uses diffusers' stock processors.
``--attn-weight 0`` trains the control without it.

Usage::

    python train/toy/train_toy_mmdit.py --out /work/toy_runs/mmdit --minutes 40
    python train/toy/train_toy_mmdit.py --out /work/toy_runs/mmdit --minutes 40 --resume  # after a cut-off
    python train/toy/train_toy_mmdit.py --out /work/toy_runs/mmdit --export ondemand_seg/models/toy-mmdit --fp16-export

``OUT/pipeline`` (EMA weights, exported at every checkpoint) is the model folder; ``OUT/ckpt.pt``
the training state; ``OUT/log.txt`` the losses. ``--minutes`` counts training time over all
resumed sessions. An export keeps the target's ``ondemand_seg.json``; a folder without one gets
:data:`DEFAULT_PRESET`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from toy_training import (
    WORDS,
    joint_output,
    joint_qkv,
    localisation_loss,
    make_data,
    to_tensor_images,
    write_preset,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ondemand_seg.pipelines.builtin import PRESET_FILE
from ondemand_seg.pipelines.tiny import build_clip_tokenizer

TOY_VAE = Path(__file__).resolve().parents[2] / "ondemand_seg" / "models" / "toy" / "vae"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero rows without T5
# The preset an exported folder ships when the target has none (maps chosen with probe_toy_mmdit.py,
# see train/toy/MMDIT.md; the self-attention repair with benchmarks/mask_recipes.py --repairs).
DEFAULT_PRESET = {
    "vocabulary": "toy",
    "generator": {"classes_per_prompt": 2, "num_inference_steps": 25, "guidance_scale": 4.0, "batch_size": 20},
    "mask": {"resolution_weights": {"1": 1.0}, "timestep_window": [0.9, 1.0], "threshold": 0.4, "ignore_band": 0.05,
             "joint_softmax": "text", "self_attention_factor": 1, "self_attention_sharpness": 2.0,
             "self_attention_mode": "replace"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=100_000, help="stop at --steps or --minutes")
    p.add_argument("--minutes", type=float, default=40.0, help="training time budget, all sessions")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=40_000, help="ToyWorld training images")
    p.add_argument("--single-fraction", type=float, default=0.5, help="share of 1-object images")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--vae", type=Path, default=TOY_VAE, help="trained toy VAE (frozen)")
    # transformer / text encoders
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--qk-norm", default=None, help="None (SD3) or rms_norm (SD3.5)")
    p.add_argument("--text-dim", type=int, default=64, help="hidden size of each CLIP encoder")
    p.add_argument("--proj-dim", type=int, default=64, help="projection size of each CLIP encoder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-drop", type=float, default=0.1)
    # rectified flow
    p.add_argument("--shift", type=float, default=1.0, help="FlowMatchEulerDiscreteScheduler shift (saved too)")
    p.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"), default="uniform")
    # token-localisation loss
    p.add_argument("--attn-weight", type=float, default=0.5, help="0 disables the loss (the control)")
    p.add_argument("--attn-warmup", type=int, default=200, help="steps to ramp the weight from 0")
    p.add_argument("--attn-softmax", choices=("text", "joint"), default="text",
                   help="probabilities renormalised over the text keys, or over all joint keys")
    # bookkeeping
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--fp16-export", action="store_true",
                   help="transformer and VAE weights in fp16 (text encoders stay fp32)")
    p.add_argument("--export", type=Path, help="only write the checkpoint's EMA pipeline to this folder")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- models
def load_vae(path: Path) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(path, dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def encode_latents(args, vae, images: np.ndarray, log) -> torch.Tensor:
    """SD3's latents of the training set, ``(mode - shift_factor) * scaling_factor`` (cached)."""
    lat_file = args.out / "latents.pt"
    if lat_file.exists():
        return torch.load(lat_file)
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor_images(images[i:i + 512])).latent_dist.mode()
                         for i in range(0, len(images), 512)])
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    log(f"latents {tuple(lat.shape)}: mean {lat.mean().item():.3f} std {lat.std().item():.3f}")
    torch.save(lat, lat_file)
    return lat


def build_text_encoder(args, tokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_dim, intermediate_size=2 * args.text_dim,
        projection_dim=args.proj_dim, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_transformer(args) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=args.image_size // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=2 * args.text_dim,
        caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=2 * args.proj_dim,
        pos_embed_max_size=args.image_size // 2, qk_norm=args.qk_norm,
    )


def encode_prompt(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompt`` of SD3's pipeline with the T5 part collapsed to one zero row:
    ``[B, 16 + 1, joint_attention_dim]`` sequence and ``[B, 2 * proj]`` pooled embeddings."""
    outs = [enc(ids, output_hidden_states=True) for enc in encoders]
    clip = torch.cat([o.hidden_states[-2] for o in outs], -1)
    pooled = torch.cat([o.text_embeds for o in outs], -1)
    return torch.cat([clip, clip.new_zeros(clip.shape[0], 1, clip.shape[2])], 1), pooled


class TrainingJointProcessor:
    """SD3 joint attention for training: ``JointAttnProcessor2_0``'s math plus the T5 bias.

    The last text key stands for ``T5_TOKENS`` identical zero rows: its logit gets
    ``log(T5_TOKENS)``. With ``records`` not None it appends the head-averaged probabilities of
    the image queries over the text keys ``[B, N_image, T_text]``, renormalised over the text keys
    (``softmax="text"``) or as they are in the joint softmax (``"joint"``)."""

    def __init__(self, records: list | None, softmax: str = "text") -> None:
        self.records, self.softmax = records, softmax

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        bias = torch.zeros(k.shape[2], dtype=q.dtype)
        bias[-1] = math.log(T5_TOKENS)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(k.shape[2], -1))
        if self.records is not None:  # the image queries' rows only: cheaper than the full matrix
            keys = k[:, :, n:] if self.softmax == "text" else k
            probs = (q[:, :, :n] @ keys.transpose(-1, -2) * attn.scale + bias[-keys.shape[2]:]).softmax(-1)
            self.records.append(probs[..., -(k.shape[2] - n):].mean(1))
        return joint_output(attn, out, n)


# ------------------------------------------------------------------------------------- export
def make_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def export_pipeline(path: Path, vae, encoders, tokenizer, transformer, shift: float, fp16: bool) -> None:
    transformer = copy.deepcopy(transformer)
    transformer.set_attn_processor(JointAttnProcessor2_0())  # stock processors in the shipped model
    vae = copy.deepcopy(vae)
    if fp16:
        transformer.to(torch.float16)
        vae.to(torch.float16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(shift), vae=vae,
        text_encoder=copy.deepcopy(encoders[0]), tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(encoders[1]), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    old = path / PRESET_FILE
    write_preset(tmp, json.loads(old.read_text()) if old.is_file() else {"image_size": 32, **DEFAULT_PRESET})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def sample_sigmas(args, n: int, rng: np.random.Generator) -> torch.Tensor:
    u = rng.random(n) if args.timestep_sampling == "uniform" else 1 / (1 + np.exp(-rng.standard_normal(n)))
    u = np.clip(u, 1e-3, 1.0)
    return torch.from_numpy(args.shift * u / (1 + (args.shift - 1) * u)).float()


# --------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_file = args.out / "ckpt.pt"
    if args.export:  # rebuild the run's architecture from its saved arguments
        saved = json.loads((args.out / "args.json").read_text())
        keep = {"out": args.out, "export": args.export, "fp16_export": args.fp16_export, "resume": True,
                "vae": Path(saved["vae"])}
        args = argparse.Namespace(**{**saved, **keep})
    if ckpt_file.exists() and not args.resume:
        raise SystemExit(f"{ckpt_file} exists: pass --resume or use a new --out")
    log_file = open(args.out / "log.txt", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if not args.export:
        (args.out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()}, indent=1))
    tokenizer = build_clip_tokenizer(WORDS, max_length=16)
    t0 = time.time()
    data = make_data(args, tokenizer)
    vae = load_vae(args.vae)
    latents = encode_latents(args, vae, data["images"], log)
    log(f"data: {len(data['images'])} images and latents ({time.time() - t0:.0f}s)")

    state = torch.load(ckpt_file, weights_only=False) if ckpt_file.exists() else None
    elapsed = state["elapsed"] if state else 0.0
    torch.manual_seed(args.seed + 1)
    transformer = build_transformer(args)
    encoders = [build_text_encoder(args, tokenizer) for _ in range(2)]
    records: list = []
    transformer.set_attn_processor(TrainingJointProcessor(records if args.attn_weight > 0 else None,
                                                          args.attn_softmax))
    ema_transformer, ema_encoders = copy.deepcopy(transformer), copy.deepcopy(encoders)
    ema_transformer.set_attn_processor(JointAttnProcessor2_0())
    ema_modules = [ema_transformer, *ema_encoders]
    for m in ema_modules:
        m.requires_grad_(False)
    modules = [transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step = 0
    rng = np.random.default_rng(args.seed + 11)
    if state:
        for m, sd in zip(modules + ema_modules, state["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["np_rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed at step {step}, {elapsed / 60:.1f} min spent")
    if args.export:
        export_pipeline(args.export, vae, ema_encoders, tokenizer, ema_transformer, args.shift, args.fp16_export)
        log(f"exported step {step} EMA weights to {args.export} (fp16 transformer/vae: {args.fp16_export})")
        return
    log(f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params, "
        f"{args.layers} joint blocks of {args.heads}x{args.head_dim}; text encoders "
        f"2 x {sum(p.numel() for p in encoders[0].parameters()) / 1e6:.3f}M")

    uncond = torch.tensor(tokenizer("", padding="max_length", max_length=tokenizer.model_max_length)["input_ids"])
    ids_all = torch.from_numpy(data["ids"])
    pos_all = torch.from_numpy(data["slot_pos"])
    cls_all = torch.from_numpy(data["slot_cls"])
    masks_all = torch.from_numpy(data["masks"])
    latent_hw = tuple(latents.shape[-2:])
    ema_params = [p for m in ema_modules for p in m.parameters()]

    def checkpoint():
        torch.save(dict(modules=[m.state_dict() for m in modules + ema_modules], opt=opt.state_dict(), step=step,
                        elapsed=elapsed, np_rng=rng, torch_rng=torch.get_rng_state()), str(ckpt_file) + ".tmp")
        os.replace(str(ckpt_file) + ".tmp", ckpt_file)
        export_pipeline(args.out / "pipeline", vae, ema_encoders, tokenizer, ema_transformer, args.shift,
                        args.fp16_export)
        log(f"checkpoint at step {step} ({elapsed / 60:.1f} min)")

    last_ckpt = time.time()
    sums = {"mse": 0.0, "attn": 0.0, "n": 0}
    session_start, elapsed_at_start, step_at_start = time.time(), elapsed, step
    for m in modules:
        m.train()
    while step < args.steps and elapsed < args.minutes * 60:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(latents), args.batch))
        x0 = latents[idx]
        keep = torch.from_numpy(rng.random(args.batch) >= args.cfg_drop)
        ids = torch.where(keep[:, None], ids_all[idx], uncond[None])
        noise = torch.randn_like(x0)
        sigma = sample_sigmas(args, args.batch, rng)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        records.clear()
        context, pooled = encode_prompt(encoders, ids)
        pred = transformer(hidden_states=xt, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigma * 1000).sample
        mse = F.mse_loss(pred, noise - x0)
        loss = mse
        attn_w = args.attn_weight * min(1.0, step / max(args.attn_warmup, 1))
        attn = torch.zeros(())
        if args.attn_weight > 0:
            slot_cls = cls_all[idx]
            slot_masks = ((masks_all[idx][:, None] == slot_cls[:, :, None, None]).float()
                          * (slot_cls > 0)[:, :, None, None])
            gate = ((slot_cls > 0) & keep[:, None]).float()
            attn = localisation_loss(records, pos_all[idx], slot_masks, gate, latent_hw, {1})
            loss = loss + attn_w * attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        sums["mse"] += mse.item()
        sums["attn"] += float(attn.detach())
        sums["n"] += 1
        elapsed = elapsed_at_start + time.time() - session_start
        if step % args.log_every == 0:
            n = sums["n"]
            log(f"step {step} mse {sums['mse'] / n:.4f} attn {sums['attn'] / n:.4f} (w {attn_w:.3f}) "
                f"lr {lr:.2e} {elapsed / 60:.1f} min, {(time.time() - session_start) / (step - step_at_start):.2f} s/step")
            sums = {"mse": 0.0, "attn": 0.0, "n": 0}
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    log(f"done: {step} steps, {elapsed / 60:.1f} min; model folder {args.out / 'pipeline'}")


if __name__ == "__main__":
    main()
