"""``python -m ondemand_seg.toyworld --out DIR``: write a ToyWorld dataset in Pascal VOC layout."""
from __future__ import annotations

import argparse

from ondemand_seg.toyworld.voc import write_voc


def _image_size(text: str) -> int | tuple[int, int]:
    """``"64"`` or ``"48x64"`` (height x width)."""
    try:
        sides = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be S or HxW, got {text!r}") from None
    if len(sides) == 1:
        return sides[0]
    if len(sides) == 2:
        return sides[0], sides[1]
    raise argparse.ArgumentTypeError(f"image size must be S or HxW, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ondemand_seg.toyworld", description=__doc__)
    parser.add_argument("--out", required=True, help="root folder; VOCdevkit/VOC2012 goes inside")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--image-size", type=_image_size, default=64, help="S or HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        voc = write_voc(args.out, args.n_train, args.n_val, image_size=args.image_size, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.n_train} train + {args.n_val} val ToyWorld samples to {voc}")


if __name__ == "__main__":
    main()
