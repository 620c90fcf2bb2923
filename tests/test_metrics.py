import math

import torch

from ondemand_seg.metrics import ConfusionMatrix, centre_box, intersection_union


def test_confusion_matrix_iou_ignores_255():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(target, prediction)
    iou = cm.iou()
    assert iou[0].item() == 1 / 3 and iou[1].item() == 2 / 3 and iou[2].item() == 1 / 2
    assert math.isnan(iou[3].item())
    assert abs(cm.mean_iou() - (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-9
    assert cm.pixel_accuracy() == 4 / 6


def test_intersection_union_and_box():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert intersection_union(a, b) == (1, 3)
    assert intersection_union(a, b, valid=torch.tensor([True, True, False, True])) == (1, 2)
    box = centre_box(8, 12)
    assert box.sum() == 4 * 6 and box[4, 6] and not box[0, 0]
