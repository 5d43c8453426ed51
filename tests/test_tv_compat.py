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
