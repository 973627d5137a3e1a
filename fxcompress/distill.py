"""Knowledge distillation (Hinton et al. 2015) for fine-tuning a compressed model against the original.

    loss = distillation_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.9)

blends the KL divergence between the temperature-softened distributions (scaled by T^2 so its
gradients keep their size as T changes) with the ordinary cross-entropy on the labels:
alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
`DistillationLoss(teacher)` packs this as the `loss` of fxcompress.training.train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_real


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """The Hinton et al. loss; usable in any training loop."""
    check_real("distillation_loss", "temperature", temperature, lo=0.0, lo_open=True)
    check_real("distillation_loss", "alpha", alpha, 0.0, 1.0)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, targets)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard


class DistillationLoss:
    """`loss(student_logits, targets, inputs)` that asks `teacher` (eval mode, no grad) for its logits."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        check_real("DistillationLoss", "temperature", temperature, lo=0.0, lo_open=True)
        check_real("DistillationLoss", "alpha", alpha, 0.0, 1.0)
        self.teacher, self.temperature, self.alpha = teacher.eval(), temperature, alpha

    def __call__(self, student_logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)
