"""train/dilated_convs.py: dilated convolutions that skip taps reading padding only compute what
``nn.Conv2d`` computes, with the same parameters and gradients, and draw no random numbers."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import segmentation

MODULE = Path(__file__).resolve().parents[1] / "train" / "dilated_convs.py"
_spec = importlib.util.spec_from_file_location("dilated_convs", MODULE)
dilated_convs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dilated_convs)


@pytest.mark.parametrize("kernel, dilation, size, expected", [
    (3, 12, 4, 0),   # ASPP on a 4×4 map: centre only
    (3, 12, 13, 1),  # offset 12 reaches a 13-pixel side
    (3, 12, 12, 0),
    (5, 2, 4, 1),    # MobileNetV3's dilated 5×5 on 4×4: offsets ±2 reach, ±4 do not
    (5, 2, 5, 2),
    (3, 1, 1, 0),
])
def test_reachable_taps(kernel, dilation, size, expected):
    assert dilated_convs.reachable_taps(kernel, dilation, size) == expected


@pytest.mark.parametrize("channels, kernel, dilation, groups, shape", [
    ((6, 4), 3, (12, 12), 1, (4, 4)),   # every off-centre tap dropped
    ((6, 4), 3, (3, 3), 1, (4, 9)),     # rows cropped, columns full
    ((6, 6), 5, (2, 2), 6, (4, 4)),     # depthwise, 5×5 → 3×3
    ((6, 4), (3, 5), (4, 1), 1, (3, 7)),
    ((6, 4), 3, (2, 2), 1, (8, 8)),     # nothing to drop: the full kernel
])
def test_cropped_conv_matches_conv2d_in_output_and_gradients(channels, kernel, dilation, groups, shape):
    torch.manual_seed(0)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = tuple((ki // 2) * d for ki, d in zip(k, dilation))
    conv = nn.Conv2d(*channels, k, padding=padding, dilation=dilation, groups=groups, bias=True)
    cropped = dilated_convs.TapCroppedConv2d(*channels, k, padding=padding, dilation=dilation, groups=groups, bias=True)
    cropped.load_state_dict(conv.state_dict())
    x = torch.randn(2, channels[0], *shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out_cropped = conv(x), cropped(x2)
    torch.testing.assert_close(out_cropped, out)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_cropped.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(cropped.weight.grad, conv.weight.grad)
    torch.testing.assert_close(cropped.bias.grad, conv.bias.grad)


def test_only_dilated_same_convs_are_croppable():
    assert dilated_convs.is_croppable(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    assert not dilated_convs.is_croppable(nn.Conv2d(4, 4, 3, padding=1))                        # not dilated
    assert not dilated_convs.is_croppable(nn.Conv2d(4, 4, 3, padding=2, dilation=2, stride=2))  # strided
    assert not dilated_convs.is_croppable(nn.Conv2d(4, 4, 3, padding=1, dilation=2))            # not "same"
    assert not dilated_convs.is_croppable(nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect"))
    assert not dilated_convs.is_croppable(nn.Conv2d(4, 4, 4, padding="same", dilation=2))       # even kernel


def test_deeplab_with_cropped_convs_is_the_same_model():
    torch.manual_seed(0)
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    cropped = copy.deepcopy(model)
    rng = torch.get_rng_state()
    # 3 ASPP branches and MobileNetV3's 3 dilated depthwise convs.
    assert dilated_convs.crop_dilated_convs(cropped) == 6
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(cropped.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, dilated_convs.TapCroppedConv2d) for m in cropped.modules()) == 6
    # Parameters are shared with nothing but their own module: the optimizer sees each once.
    assert len(list(cropped.parameters())) == len(list(model.parameters()))
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for m in (model, cropped):
        torch.manual_seed(1)  # the ASPP's dropout
        out = m(x)["out"]
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(model.named_parameters(), cropped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
