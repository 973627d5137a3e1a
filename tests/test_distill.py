"""Knowledge distillation loss (Hinton et al. 2015)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.distill import DistillationLoss, distillation_loss
from fxcompress.errors import ConfigError
from fxcompress.training import train


def test_matches_the_formula():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    p_t = F.softmax(t / 3.0, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3.0, dim=1))).sum(dim=1).mean()
    expected = 0.7 * 9.0 * kl + 0.3 * F.cross_entropy(s, y)
    assert distillation_loss(s, t, y, temperature=3.0, alpha=0.7).item() == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_identical_logits_have_no_soft_loss():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(distillation_loss(s, torch.randn(4, 3), y, alpha=0.0), F.cross_entropy(s, y))
    assert distillation_loss(s, s.clone(), y, alpha=1.0).abs().item() < 1e-6


def test_student_learns_to_match_the_teacher_in_the_training_loop():
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(256, 6)
    y = teacher(x).argmax(dim=1)
    loss = DistillationLoss(teacher, temperature=2.0, alpha=1.0)
    gap = lambda: (student(x) - teacher(x)).abs().mean().item()  # noqa: E731
    before = gap()
    train(student, (x, y), epochs=30, lr=1e-2, batch_size=64, loss=loss)
    assert gap() < 0.5 * before
    assert teacher.weight.grad is None  # the teacher is never trained


@pytest.mark.parametrize("kwargs, field", [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha")])
def test_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=f"DistillationLoss.{field}"):
        DistillationLoss(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ConfigError, match=f"distillation_loss.{field}"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **kwargs)
