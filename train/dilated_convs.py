"""Dilated convolutions that skip the kernel taps which can only read zero padding.

DeepLabV3's ASPP branches (dilation 12, 24, 36) and MobileNetV3's dilated last stage are sized
for 512 px inputs. On a small crop the feature map is smaller than the dilation (64 px crops give
a 4×4 map at output stride 16), so every off-centre tap of those kernels lands on padding at
every output position: the convolution is a 1×1 (or smaller-kernel) convolution that still pays
for the full kernel, forward and backward. :class:`TapCroppedConv2d` computes the same output
with the taps that can reach the input. No library (torch, torchvision) does this: cuDNN/oneDNN
run the full dilated kernel.

The result is the same function with the same parameters and the same gradients (a dropped tap's
gradient is a sum of zero-padding products, zero either way); only the floating-point summation
order may differ. State dict keys are unchanged, so checkpoints load either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reachable_taps(kernel: int, dilation: int, size: int) -> int:
    """Taps each side of the centre of a "same"-padded, stride-1 kernel that reach an input of
    ``size`` pixels: tap ``j`` (offset ``j * dilation``) reads inside the input for some output
    position only when ``|j| * dilation <= size - 1``."""
    return min(kernel // 2, (size - 1) // dilation)


class TapCroppedConv2d(nn.Conv2d):
    """``nn.Conv2d`` ("same" zero padding, stride 1, odd kernel) that drops the taps which only
    ever read padding for the input at hand; the full kernel runs when every tap can reach it.

    Input ``[B, C_in, H, W]`` → output ``[B, C_out, H, W]``, equal to ``nn.Conv2d``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        rh, rw = reachable_taps(kh, dh, x.shape[-2]), reachable_taps(kw, dw, x.shape[-1])
        if (rh, rw) == (kh // 2, kw // 2):
            return super().forward(x)
        weight = self.weight[:, :, kh // 2 - rh : kh // 2 + rh + 1, kw // 2 - rw : kw // 2 + rw + 1]
        return F.conv2d(x, weight, self.bias, 1, (rh * dh, rw * dw), self.dilation, self.groups)


def is_croppable(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` whose dilation exceeds 1 and whose padding keeps the size ("same")."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.stride != (1, 1):
        return False
    if not isinstance(conv.padding, tuple) or max(conv.dilation) == 1:
        return False
    return all(k % 2 == 1 and p == (k // 2) * d for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


def crop_dilated_convs(model: nn.Module) -> int:
    """Replace, in place, every dilated "same" ``nn.Conv2d`` of ``model`` with a
    :class:`TapCroppedConv2d` holding the same parameter tensors; returns how many were replaced.

    Built on the meta device and handed the old parameters, so no random numbers are drawn and
    the model's initialisation is untouched.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_croppable(child):
                continue
            cropped = TapCroppedConv2d(child.in_channels, child.out_channels, child.kernel_size, padding=child.padding,
                                       dilation=child.dilation, groups=child.groups, bias=child.bias is not None,
                                       device="meta")
            cropped.weight = child.weight
            cropped.bias = child.bias
            setattr(parent, name, cropped)
            replaced += 1
    return replaced
