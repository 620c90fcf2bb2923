import math

import torch

from ondemand_seg.metrics import ConfusionMatrix
from ondemand_seg.settings.label_spaces import IGNORE_INDEX


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
    assert cm.mat.sum() == 6 and cm.mat[0, 1] == 1 and cm.mat[2, 0] == 1, "rows are truth, columns prediction"


def test_updates_accumulate_like_one_big_update():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 5, (8, 8), generator=g) for _ in range(3)]
    predictions = [torch.randint(0, 5, (8, 8), generator=g) for _ in range(3)]
    targets[1][0] = IGNORE_INDEX
    split, whole = ConfusionMatrix(5), ConfusionMatrix(5)
    for t, p in zip(targets, predictions):
        split.update(t, p)
    whole.update(torch.stack(targets), torch.stack(predictions))
    assert torch.equal(split.mat, whole.mat) and split.mat.sum() == 3 * 64 - 8


def test_custom_ignore_index_and_empty_matrix():
    cm = ConfusionMatrix(3, ignore_index=2)
    cm.update(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 0]))
    assert cm.mat.sum() == 2 and cm.iou()[0].item() == 1 / 2 and cm.iou()[1].item() == 0.0
    assert ConfusionMatrix(3).pixel_accuracy() == 0.0
    assert math.isnan(ConfusionMatrix(3).mean_iou())


def test_reduce_without_distributed_keeps_the_counts():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    before = cm.mat.clone()
    cm.reduce_from_all_processes()
    assert torch.equal(cm.mat, before)
