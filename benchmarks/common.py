"""What the benchmarks share: running the training script in-process and writing results."""
from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_deeplab.py"
sys.path.insert(0, str(TRAIN_SCRIPT.parent))

import train_deeplab  # noqa: E402


def train(flags: list[str]) -> dict:
    """Run train/train_deeplab.py with ``flags`` in this process; its final summary."""
    return train_deeplab.main(train_deeplab.get_args_parser().parse_args(flags))


def write_json(path: Path | None, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating folders); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
