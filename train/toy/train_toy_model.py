"""Train the small ToyWorld text-to-image model that ships at ``ondemand_seg/models/toy/``.

README
======
What it trains, from scratch, on ToyWorld (32x32 px, 1-3 coloured shapes, captions such as
"a photo of a triangle, a cross and a circle"), all saved as one diffusers Stable Diffusion folder
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``, safetensors) that loads with
``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
requires_safety_checker=False, use_safetensors=True)``:

* VAE: ``AutoencoderKL`` (16, 32) channels, no mid-block attention, downsampling factor 2,
  4 latent channels (32x32x3 -> 16x16x4),
  trained first (L1 + MSE reconstruction, KL weight 1e-6); ``scaling_factor`` = 1 / latent std.
* Text encoder: ``CLIPTextModel`` with 0 transformer layers (token + position embeddings and the
  final layer norm), so no token can carry another token's class; tokenizer from
  ``ondemand_seg.pipelines.tiny.build_clip_tokenizer`` (each word one token, max_length 16).
* UNet: ``UNet2DConditionModel`` on the 16x16 latent, ``block_out_channels=(32, 64, 128)``;
  cross-attention at 16x16 (latent factor 1), 8x8 (factor 2) and 4x4 (factor 4, mid block);
  self-attention only at 8x8 and 4x4 (at 16x16 the transformer's first attention is a second
  cross-attention, ``only_cross_attention``), because 16x16 self-attention doubles the CPU cost.
* Diffusion: DDPM training, SD's ``scaled_linear`` betas, epsilon prediction, 1000 steps; saved
  with a ``DDIMScheduler`` of the same betas. 10% of captions are dropped to "" for
  classifier-free guidance. EMA of the UNet and text encoder weights is what gets saved.

**Extra supervision (read this before using the model's attention as a benchmark):** besides the
denoising loss, the UNet is trained with a *token-localisation loss* on its cross-attention that
uses ToyWorld's exact masks: for every class word of a caption, in every cross-attention layer,
the head-averaged attention probability of that word's token at each query position is pushed
towards the fraction of that position's cell covered by the visible mask of that class
(binary cross-entropy, ``--attn-weight``, linearly ramped in over ``--attn-warmup`` steps).
A custom attention processor records the probabilities during training only; the saved model
uses diffusers' standard processors and needs nothing custom at inference. So the class token's
attention of this model localises *because it was taught to*: the model is a test fixture for the
attention-to-mask machinery of ``ondemand_seg``, not evidence that attention localises by itself
(see ``/work/shared/notes/toy-model.md`` for what happens without the loss).

Usage::

    python train/toy/train_toy_model.py --out runs/toy --minutes 35
    python train/toy/train_toy_model.py --out runs/toy --minutes 35 --resume   # after a cut-off

``OUT/pipeline`` (EMA weights, exported at every checkpoint) is the model folder; ``OUT/ckpt.pt``
holds the full training state; ``OUT/log.txt`` the losses. ``--minutes`` counts training time over
all resumed sessions (the VAE phase included).

An exported folder ships ``ondemand_seg.json``, the settings ``ondemand_seg`` reads with the model:
the export target's own preset is kept (and checked to resolve); a folder without one gets
:data:`DEFAULT_PRESET` at the run's image size.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from toy_training import (
    WORDS,
    localisation_loss,
    make_data,
    to_tensor_images,
    write_preset,
)
from transformers import CLIPTextConfig, CLIPTextModel

from ondemand_seg.pipelines.builtin import PRESET_FILE
from ondemand_seg.pipelines.tiny import build_clip_tokenizer
from ondemand_seg.toyworld import color_oracle

# The preset an exported folder ships (``ondemand_seg.json``) when the export target has none:
# the built-in "toy" vocabulary (ToyWorld's classes, "a photo of a {class}", the captions' form)
# and the settings chosen for the shipped model (train/toy/PROBES.md); image_size is the run's.
DEFAULT_PRESET = {
    "vocabulary": "toy",
    "generator": {"classes_per_prompt": 2, "num_inference_steps": 25, "guidance_scale": 4.0, "batch_size": 20},
    "mask": {"resolution_weights": {"1": 1.0}, "timestep_window": [0.9, 1.0], "threshold": 0.4, "ignore_band": 0.05},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=100_000, help="UNet steps (stop at --steps or --minutes)")
    p.add_argument("--minutes", type=float, default=35.0, help="training time budget, all sessions")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=40_000, help="ToyWorld training images")
    p.add_argument("--single-fraction", type=float, default=0.5, help="share of 1-object images")
    p.add_argument("--max-objects", type=int, default=3)
    # VAE
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--vae-mid-attn", action="store_true", help="self-attention in the VAE mid blocks")
    # UNet / text encoder
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8], help="attention heads per level")
    p.add_argument("--self-attn-16", action="store_true", help="self-attention at the 16x16 level too")
    p.add_argument("--text-layers", type=int, default=0)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-drop", type=float, default=0.1)
    # token-localisation loss
    p.add_argument("--attn-weight", type=float, default=0.1, help="0 disables the loss")
    p.add_argument("--attn-warmup", type=int, default=200, help="steps to ramp the weight from 0")
    p.add_argument("--attn-tmax", type=int, default=1000, help="apply only for timesteps t < this")
    p.add_argument("--attn-res", type=int, nargs="+", default=[1, 2, 4], help="latent factors with the loss")
    # bookkeeping
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--fp16-export", action="store_true",
                   help="save UNet and VAE weights in fp16 (the text encoder stays fp32, so a load without "
                        "a dtype gives an all-fp32 pipeline: diffusers upcasts, transformers would not)")
    p.add_argument("--export", type=Path, help="only write the checkpoint's EMA pipeline to this folder")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ VAE
def build_vae(args) -> AutoencoderKL:
    ch = tuple(args.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=ch, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
        norm_num_groups=8, sample_size=args.image_size, mid_block_add_attention=args.vae_mid_attn,
    )


def train_vae(args, data, log) -> tuple[AutoencoderKL, torch.Tensor]:
    """Train (or load) the VAE and return it with the cached scaled latents of the training set."""
    vae_dir, lat_file = args.out / "vae_trained", args.out / "latents.pt"
    if (vae_dir / "config.json").exists() and lat_file.exists():
        return AutoencoderKL.from_pretrained(vae_dir), torch.load(lat_file)
    torch.manual_seed(args.seed)
    vae = build_vae(args)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    images = data["images"]
    rng = np.random.default_rng(args.seed + 7)
    start = time.time()
    for step in range(args.vae_steps):
        lr = args.vae_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor_images(images[rng.integers(0, len(images), args.vae_batch)])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} mse {F.mse_loss(rec, x).item():.5f} "
                f"({time.time() - start:.0f}s)")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor_images(images[i:i + 512])).latent_dist.mode()
                         for i in range(0, len(images), 512)])
        std = lat.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        sample = to_tensor_images(images[:256])
        rec = vae.decode(vae.encode(sample).latent_dist.mode()).sample
        rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        inter = union = 0
        for img, m in zip(rec_u8, data["masks"][:256]):
            o = color_oracle(img)
            inter += np.count_nonzero((o == m) & (m > 0))
            union += np.count_nonzero((o > 0) | (m > 0))
        log(f"vae done: latent mean {lat.mean().item():.3f} std {std:.3f}, "
            f"held-in recon mse {F.mse_loss(rec, sample).item():.5f}, "
            f"colour-oracle IoU of reconstructions vs truth {inter / max(union, 1):.3f}, {time.time() - start:.0f}s")
    vae.save_pretrained(vae_dir, safe_serialization=True)
    lat = lat / std
    torch.save(lat, lat_file)
    return vae, lat


# ------------------------------------------------------------------------------ UNet + text model
def build_text_encoder(args, tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_dim, intermediate_size=2 * args.text_dim,
        num_hidden_layers=args.text_layers, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(args) -> UNet2DConditionModel:
    ch = tuple(args.channels)
    n = len(ch)
    assert n >= 2, "need cross-attention at two resolutions at least"
    down = ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",) * (n - 2)
    up = ("UpBlock2D",) * (n - 2) + ("CrossAttnUpBlock2D",) * 2
    only_cross = (not args.self_attn_16,) + (False,) * (n - 1)
    return UNet2DConditionModel(
        sample_size=args.image_size // 2, in_channels=4, out_channels=4, block_out_channels=ch,
        layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=8,
        cross_attention_dim=args.text_dim, attention_head_dim=tuple(args.heads[:n]),
        only_cross_attention=only_cross,
    )


class LocalisationProcessor:
    """Cross-attention processor for training: plain softmax attention that also records the
    head-averaged probabilities ``[B, N, T]`` so the localisation loss can read them."""

    def __init__(self, records: list) -> None:
        self.records = records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        assert encoder_hidden_states is not None and attention_mask is None and hidden_states.ndim == 3
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # [B, H, N, T]
        self.records.append(probs.mean(1))
        out = (probs @ v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_training_processors(unet, records) -> int:
    procs, n = {}, 0
    for name in unet.attn_processors:
        module = unet.get_submodule(name[: -len(".processor")])
        if module.is_cross_attention:
            procs[name], n = LocalisationProcessor(records), n + 1
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return n


# ------------------------------------------------------------------------------------- export
def make_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


def export_pipeline(path: Path, vae, text_encoder, tokenizer, unet, fp16: bool, image_size: int) -> None:
    unet = copy.deepcopy(unet)
    unet.set_attn_processor(AttnProcessor2_0())  # standard processors in the shipped model
    text_encoder = copy.deepcopy(text_encoder)
    vae = copy.deepcopy(vae)
    scheduler = DDIMScheduler(**make_scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if fp16:
        unet.to(torch.float16)
        vae.to(torch.float16)
    tmp = path.with_name(path.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    old = path / PRESET_FILE
    write_preset(tmp, json.loads(old.read_text()) if old.is_file() else {"image_size": image_size, **DEFAULT_PRESET})
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_file = args.out / "ckpt.pt"
    if args.export:  # rebuild the run's architecture from its saved arguments
        saved = json.loads((args.out / "args.json").read_text())
        keep = {"out": args.out, "export": args.export, "fp16_export": args.fp16_export, "resume": True}
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
    log(f"data: {len(data['images'])} images ({time.time() - t0:.0f}s)")

    state = torch.load(ckpt_file, weights_only=False) if ckpt_file.exists() else None
    vae_start = time.time()
    vae, latents = train_vae(args, data, log)
    vae.requires_grad_(False)
    elapsed = state["elapsed"] if state else time.time() - vae_start  # VAE time counts once

    torch.manual_seed(args.seed + 1)
    unet, text_encoder = build_unet(args), build_text_encoder(args, tokenizer)
    records: list = []
    n_cross = install_training_processors(unet, records)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    ema_unet.set_attn_processor(AttnProcessor2_0())
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step = 0
    rng = np.random.default_rng(args.seed + 11)
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng = state["np_rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed at step {step}, {elapsed / 60:.1f} min spent")
    if args.export:
        export_pipeline(args.export, vae, ema_text, tokenizer, ema_unet, args.fp16_export, args.image_size)
        log(f"exported step {step} EMA weights to {args.export} (fp16 unet/vae: {args.fp16_export})")
        return
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, {n_cross} cross-attn layers; "
        f"text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f}M; "
        f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M")

    noise_sched = DDPMScheduler(**make_scheduler_config())
    uncond = torch.tensor(tokenizer("", padding="max_length", max_length=tokenizer.model_max_length)["input_ids"])
    ids_all = torch.from_numpy(data["ids"])
    pos_all = torch.from_numpy(data["slot_pos"])
    cls_all = torch.from_numpy(data["slot_cls"])
    masks_all = torch.from_numpy(data["masks"])
    latent_hw = tuple(latents.shape[-2:])
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())

    def checkpoint():
        torch.save(dict(unet=unet.state_dict(), text=text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                        ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed,
                        np_rng=rng, torch_rng=torch.get_rng_state()), str(ckpt_file) + ".tmp")
        os.replace(str(ckpt_file) + ".tmp", ckpt_file)
        export_pipeline(args.out / "pipeline", vae, ema_text, tokenizer, ema_unet, args.fp16_export, args.image_size)
        log(f"checkpoint at step {step} ({elapsed / 60:.1f} min)")

    last_ckpt = time.time()
    sums = {"mse": 0.0, "attn": 0.0, "n": 0}
    session_start, elapsed_at_start = time.time(), elapsed
    unet.train()
    text_encoder.train()
    while step < args.steps and elapsed < args.minutes * 60:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(latents), args.batch))
        x0 = latents[idx]
        keep = torch.from_numpy(rng.random(args.batch) >= args.cfg_drop)
        ids = torch.where(keep[:, None], ids_all[idx], uncond[None])
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,))
        xt = noise_sched.add_noise(x0, noise, t)
        records.clear()
        enc = text_encoder(ids)[0]
        pred = unet(xt, t, enc).sample
        mse = F.mse_loss(pred, noise)
        loss = mse
        attn_w = args.attn_weight * min(1.0, step / max(args.attn_warmup, 1))
        attn = torch.zeros(())
        if args.attn_weight > 0:
            slot_cls = cls_all[idx]
            slot_masks = (masks_all[idx][:, None] == slot_cls[:, :, None, None]).float() * (slot_cls > 0)[:, :, None, None]
            gate = ((slot_cls > 0) & keep[:, None] & (t < args.attn_tmax)[:, None]).float()
            attn = localisation_loss(records, pos_all[idx], slot_masks, gate, latent_hw, set(args.attn_res))
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
                f"lr {lr:.2e} {elapsed / 60:.1f} min, {(time.time() - session_start) / max(step - (state['step'] if state else 0), 1):.2f} s/step")
            sums = {"mse": 0.0, "attn": 0.0, "n": 0}
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    log(f"done: {step} steps, {elapsed / 60:.1f} min; model folder {args.out / 'pipeline'}")


if __name__ == "__main__":
    main()
