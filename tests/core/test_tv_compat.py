import subprocess
import sys


def test_torchvision_models_import_through_the_workaround():
    from dpcompress.tv_compat import import_torchvision

    tv = import_torchvision()
    model = tv.models.mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    import torch

    assert hasattr(torch.ops.torchvision, "nms")  # defined by torchvision's library or by the workaround


def test_workaround_is_a_no_op_when_torchvision_already_imports():
    # A second call (torchvision now importable) must return the same module without redefining anything.
    code = ("from dpcompress.tv_compat import import_torchvision as f; a = f(); b = f(); "
            "import dpcompress.tv_compat as c; print(a is b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def iou(a, b) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_reference_nms_matches_greedy_suppression_by_hand():
    import torch

    from dpcompress.tv_compat import nms_reference

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(300, 2, generator=generator) * 20], dim=1)
    scores = torch.rand(300, generator=generator)
    for threshold in (0.3, 0.5, 0.7):
        kept = []
        for index in scores.argsort(descending=True).tolist():
            if all(iou(boxes[index].tolist(), boxes[k].tolist()) <= threshold for k in kept):
                kept.append(index)
        assert nms_reference(boxes, scores, threshold).tolist() == kept
        assert 0 < len(kept) < 300
