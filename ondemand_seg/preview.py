"""A picture of what the generator makes: images beside their mask overlays, captioned with their
prompts, above a legend of the class colours that appear."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from .settings.label_spaces import IGNORE_INDEX, validate_label_space, voc_palette

# Tiles smaller than this are enlarged so that single pixels and the caption text stay readable.
MIN_TILE = 128
# Captions longer than this many lines are cut, so one verbose prompt cannot stretch every row.
MAX_CAPTION_LINES = 3
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def _colors(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    palette = voc_palette()
    return [tuple(palette[3 * i : 3 * i + 3]) for i in ids]


def _check_inputs(
    images: torch.Tensor, masks: torch.Tensor, prompts: Sequence[str], label_space: Sequence[str],
    alpha: float, columns: int,
) -> tuple[str, ...]:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got {_describe(images)}")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.long or masks.ndim != 3:
        raise ValueError(f"masks must be a long tensor [N, H, W], got {_describe(masks)}")
    if isinstance(prompts, str):
        # A bare string is a sequence of characters and would otherwise pass the length check.
        raise ValueError(f"prompts must be a sequence of strings, one per image, got the string {prompts!r}")
    prompts = list(prompts)
    n = images.shape[0]
    if n == 0:
        raise ValueError("nothing to preview: images holds 0 samples")
    if masks.shape[0] != n or len(prompts) != n:
        raise ValueError(f"sample counts differ: {n} images, {masks.shape[0]} masks, {len(prompts)} prompts")
    if masks.shape[1:] != images.shape[2:]:
        raise ValueError(f"masks are {tuple(masks.shape[1:])} but images are {tuple(images.shape[2:])} (H, W)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str, got {prompt!r}")
    names = validate_label_space(label_space)
    ids = torch.unique(masks)
    bad = [int(i) for i in ids if (i < 0 or i >= len(names)) and i != IGNORE_INDEX]
    if bad:
        raise ValueError(
            f"mask ids {bad} are outside the label space of {len(names)} classes (0..{len(names) - 1}, {IGNORE_INDEX} ignore)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    return names


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return repr(type(value).__name__)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words wider than a line are split, overflow ends in '…'."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        # A token with no spaces (a URL, a long compound) still has to fit, so break it by characters.
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _to_pil(tile: torch.Tensor, scale: int) -> Image.Image:
    picture = Image.fromarray(tile.permute(1, 2, 0).contiguous().numpy())
    if scale > 1:
        # Nearest neighbour keeps mask edges and pixels crisp instead of smearing colours together.
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def render_preview(
    images: torch.Tensor,
    masks: torch.Tensor,
    prompts: Sequence[str],
    label_space: Sequence[str],
    alpha: float = 0.5,
    columns: int = 4,
) -> Image.Image:
    """Draw each image beside its mask overlay, its prompt underneath, and a colour legend at the bottom.

    Classes are painted in Pascal VOC colours (id ``i`` gets VOC colour ``i``, ignore 255 gets VOC's
    cream); background (id 0) is left unpainted and kept out of the legend. Tiles whose shorter side is
    under 128 px are enlarged by a whole factor with nearest neighbours.

    Args:
        images: ``[N, 3, H, W]`` uint8 RGB.
        masks: ``[N, H, W]`` long label ids into ``label_space``, 255 ignore.
        prompts: ``N`` strings, the prompt of each sample; long ones are wrapped (at most 3 lines) and
            cut with '…' to the width of their image/overlay pair.
        label_space: class names, position = id, ``label_space[0] == "background"``.
        alpha: opacity of the mask colours over the image.
        columns: samples (image/overlay pairs) per row.
    Returns:
        An RGB image: ``ceil(N / columns)`` rows of captioned pairs on white, then a legend strip with a
        swatch and name for every class present in any mask (and "ignore" if any 255).
    Raises:
        ValueError: mismatched ``N``, wrong dtype or shape, a non-string prompt, an invalid label space,
            or a mask id that is neither in the label space nor 255; the message names the bad value.
    """
    names = _check_inputs(images, masks, prompts, label_space, alpha, columns)
    n, _, height, width = images.shape
    scale = max(1, math.ceil(MIN_TILE / min(height, width)))
    tile_w, tile_h = width * scale, height * scale

    font_size = max(12, min(24, tile_w // 9))
    font = ImageFont.load_default(size=font_size)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 2
    pad = max(4, font_size // 2)
    # Pairs sit further from each other than an image from its own overlay, so each pair reads as one.
    gap = 3 * pad

    present = [int(i) for i in torch.unique(masks) if i != 0]  # ascending, so 255 (ignore) comes last
    pair_w = 2 * tile_w + pad
    captions = [_wrap(p, font, pair_w, MAX_CAPTION_LINES) for p in prompts]
    # One caption height for the whole grid keeps rows aligned; at least one line so empty prompts look intended.
    caption_h = max(1, max(len(c) for c in captions)) * line_h
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    cell_w, cell_h = pair_w, tile_h + pad // 2 + caption_h
    grid_w = 2 * pad + cols * cell_w + (cols - 1) * gap
    grid_h = 2 * pad + rows * cell_h + (rows - 1) * gap

    swatch = line_h - 4
    entries = [(i, "ignore" if i == IGNORE_INDEX else names[i]) for i in present]
    entry_ws = [swatch + pad // 2 + math.ceil(font.getlength(name)) for _, name in entries]
    empty_note = "legend: no labelled pixels (background only)"
    widest = max(entry_ws, default=math.ceil(font.getlength(empty_note)))
    # A long class name on a one-sample grid must not be clipped, so the canvas widens to the widest entry.
    canvas_w = max(grid_w, widest + 2 * pad)
    legend_lines: list[list[int]] = [[]]
    x = pad
    for k, entry_w in enumerate(entry_ws):
        if legend_lines[-1] and x + entry_w > canvas_w - pad:
            legend_lines.append([])
            x = pad
        legend_lines[-1].append(k)
        x += entry_w + 2 * pad
    legend_h = pad + len(legend_lines) * (line_h + pad // 2) + pad

    canvas = Image.new("RGB", (canvas_w, grid_h + legend_h), WHITE)
    draw = ImageDraw.Draw(canvas)
    colors = dict(zip(present, _colors(present)))
    for s in range(n):
        x0 = pad + (s % cols) * (cell_w + gap)
        y0 = pad + (s // cols) * (cell_h + gap)
        ids = [i for i in present if bool((masks[s] == i).any())]
        painted = images[s]
        if ids:  # draw_segmentation_masks warns on an empty stack; an all-background mask needs no paint
            stack = torch.stack([masks[s] == i for i in ids])
            painted = draw_segmentation_masks(images[s], stack, alpha=alpha, colors=[colors[i] for i in ids])
        canvas.paste(_to_pil(images[s], scale), (x0, y0))
        canvas.paste(_to_pil(painted, scale), (x0 + tile_w + pad, y0))
        for k, line in enumerate(captions[s]):
            line_x = x0 + (pair_w - font.getlength(line)) / 2
            draw.text((line_x, y0 + tile_h + pad // 2 + k * line_h), line, fill=BLACK, font=font)

    # A rule separates the legend from the last row so it does not read as one more caption.
    draw.line([(pad, grid_h), (canvas_w - pad, grid_h)], fill=(160, 160, 160), width=1)
    y = grid_h + pad
    if not entries:
        draw.text((pad, y), empty_note, fill=BLACK, font=font)
    for line in legend_lines:
        x = pad
        for k in line:
            class_id, name = entries[k]
            sy = y + (line_h - swatch) // 2
            draw.rectangle([x, sy, x + swatch - 1, sy + swatch - 1], fill=colors[class_id], outline=BLACK)
            draw.text((x + swatch + pad // 2, y), name, fill=BLACK, font=font)
            x += entry_ws[k] + 2 * pad
        y += line_h + pad // 2
    return canvas


def _image_array(image: Any, index: int) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"samples[{index}].image must be an RGB PIL image or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array


def _mask_array(mask: Any, index: int) -> np.ndarray:
    if isinstance(mask, Image.Image):
        # Converting a "P" image would turn ids into palette colours, so only id-carrying modes pass.
        if mask.mode not in ("P", "L"):
            raise ValueError(f"samples[{index}].mask must be a PIL image of mode 'P' or 'L', got mode {mask.mode!r}")
        mask = np.array(mask)
    array = np.asarray(mask)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"samples[{index}].mask must be a uint8 [H, W] array, got {array.dtype} {array.shape}")
    return array


def write_preview(
    samples: Sequence[Any],
    label_space: Sequence[str],
    out: str | Path,
    alpha: float = 0.5,
    columns: int = 4,
) -> Path:
    """Render already generated samples with :func:`render_preview` and save the picture as PNG.

    Args:
        samples: objects with ``.image`` (RGB PIL image or uint8 ``[H, W, 3]`` array), ``.mask`` (PIL
            image of mode "P"/"L" or uint8 ``[H, W]`` array of label ids, 255 ignore) and ``.prompt``
            (str), e.g. :class:`~ondemand_seg.source.RawSample`; all of one size.
        label_space: class names, position = id.
        out: PNG file to write; missing parent folders are created.
    Returns:
        ``Path(out)``.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("nothing to preview: samples is empty")
    images = [_image_array(s.image, i) for i, s in enumerate(samples)]
    masks = [_mask_array(s.mask, i) for i, s in enumerate(samples)]
    sizes = sorted({a.shape[:2] for a in images} | {m.shape for m in masks})
    if len(sizes) > 1:
        raise ValueError(f"samples must share one (H, W) size for a grid, got {sizes}")
    picture = render_preview(
        torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images]),
        torch.stack([torch.from_numpy(m).long() for m in masks]),
        [s.prompt for s in samples],
        label_space,
        alpha=alpha,
        columns=columns,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    return out
