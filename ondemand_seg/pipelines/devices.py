"""Which device generates: a ``device`` argument checked against this machine, and the default
(CUDA, round-robin over DataLoader workers, else CPU)."""
from __future__ import annotations

import torch


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` when it names one this machine has (``None`` stays ``None``:
    the default, CUDA when available); an error naming it otherwise.

    Raises:
        TypeError: not a str or ``torch.device``. ValueError: an unknown device name, CUDA (or
            another accelerator) that is not available, or a device index beyond the count.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str like 'cpu' or 'cuda:1', a torch.device or None, got {device!r} "
                        f"({type(device).__name__})")
    name = str(device)
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device name ({error})") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    elif backend is not None and hasattr(backend, "is_available") and hasattr(backend, "device_count"):
        available = backend.is_available()
        count = backend.device_count() if available else 0
    else:
        raise ValueError(f"device {name!r}: ondemand_seg generates on cpu, cuda, mps or xpu devices")
    if not available:
        raise ValueError(f"device {name!r} is not available on this machine (torch.{parsed.type}.is_available() is "
                         "False); give device='cpu' or leave it None")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} {parsed.type} device(s)")
    return parsed


def pick_device(device: str | torch.device | None, slot: int = 0) -> torch.device:
    """The device for generation: as given, else CUDA (GPU ``slot`` modulo the visible count) or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", slot % torch.cuda.device_count())
