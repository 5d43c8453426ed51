"""Training: loss goes down, accuracy is right, distillation loss, checkpoint resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dpcompress import zoo
from dpcompress.errors import UserError
from dpcompress.training.train import distillation_loss, evaluate, mean_loss, train

from tests.digits_helpers import digits16, trained_tiny


def test_training_reduces_loss_and_evaluate_counts_correct_predictions():
    data = digits16()
    torch.manual_seed(1)
    model = zoo.tiny_mobilenet_v2().eval()
    before = mean_loss(model, data.holdout)
    train(model, data.train, steps=60, lr=0.2, batch_size=32)
    assert mean_loss(model, data.holdout) < before - 0.3
    images, labels = data.holdout.tensors
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean().item()
    assert evaluate(model, data.holdout, batch_size=7) == pytest.approx(expected)


def test_distillation_loss_is_kl_on_softened_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    t = 2.0
    p = F.softmax(teacher / t, 1)
    expected = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_full_distillation_ignores_the_labels_and_zero_distillation_the_teacher():
    # loss = (1 - a) * CE + a * KD: at a = 1 the labels do not matter, at a = 0 the teacher does not.
    images, labels = (t[:128] for t in digits16().train.tensors)
    teacher = trained_tiny()
    start = zoo.tiny_mobilenet_v2()
    true_labels = torch.utils.data.TensorDataset(images, labels)
    wrong_labels = torch.utils.data.TensorDataset(images, (labels + 1) % 10)
    runs = {}
    for name, dataset, distill, with_teacher in [("kd", true_labels, 1.0, True), ("kd_wrong", wrong_labels, 1.0, True),
                                                 ("ce", true_labels, 0.0, True), ("plain", true_labels, 0.0, False)]:
        model = copy.deepcopy(start)
        train(model, dataset, steps=4, lr=0.1, batch_size=32, distill=distill,
              teacher=teacher if with_teacher else None)
        runs[name] = torch.cat([p.flatten() for p in model.parameters()])
    assert torch.allclose(runs["kd"], runs["kd_wrong"], atol=1e-6)
    assert torch.equal(runs["ce"], runs["plain"])
    assert not torch.allclose(runs["kd"], runs["ce"], atol=1e-3)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    data = digits16()
    subset = torch.utils.data.TensorDataset(*(t[:256] for t in data.train.tensors))
    straight = zoo.tiny_mobilenet_v2()
    resumed = copy.deepcopy(straight)
    train(straight, subset, epochs=2, lr=0.1, batch_size=32, checkpoint=tmp_path / "a.pt")

    class Stop(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Stop

    with pytest.raises(Stop):
        train(resumed, subset, epochs=2, lr=0.1, batch_size=32, checkpoint=tmp_path / "b.pt",
              progress=stop_after_first_epoch)
    fresh = zoo.tiny_mobilenet_v2()  # a new process would start from scratch weights
    result = train(fresh, subset, epochs=2, lr=0.1, batch_size=32, checkpoint=tmp_path / "b.pt")
    assert result.epochs == 2 and len(result.epoch_losses) == 1
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_is_a_user_error(tmp_path):
    subset = torch.utils.data.TensorDataset(*(t[:64] for t in digits16().train.tensors))
    model = zoo.tiny_mobilenet_v2()
    train(model, subset, epochs=1, lr=0.1, batch_size=32, checkpoint=tmp_path / "s.pt")
    with pytest.raises(UserError, match="other settings"):
        train(model, subset, epochs=1, lr=0.05, batch_size=32, checkpoint=tmp_path / "s.pt")
