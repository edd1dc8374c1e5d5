"""Knowledge distillation: a float teacher's softened outputs teach a compressed student.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task_loss

(Hinton et al. 2015). The T^2 keeps the soft term's gradient on the same scale as the task
loss's whatever the temperature (the softened gradients shrink as 1/T^2). In a loop::

    kd = Distiller(teacher, student, temperature=4.0, alpha=0.7)
    for x, y in loader:
        loss, logits = kd(x, y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

The student may be anything that returns logits: pruned (masks from
:mod:`lowbit.compress.pruning` stay in place), decomposed, or fake-quantized for QAT. The
teacher runs under ``torch.no_grad()`` in eval mode and is never updated.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None,
                      temperature: float = 4.0, alpha: float = 0.5,
                      task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                      ) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * task_loss(student, target)``.

    Logits are [..., classes]; the KL is summed over classes and averaged over everything else.
    With ``target=None`` only the soft term is returned (alpha is then ignored).
    """
    if temperature <= 0:
        raise ValueError(f"lowbit.compress.distillation_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"lowbit.compress.distillation_loss: student logits {list(student_logits.shape)} and "
                         f"teacher logits {list(teacher_logits.shape)} differ in shape")
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().reshape(-1, c).float() / temperature, dim=-1)
    soft = F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2
    if target is None:
        return soft
    return alpha * soft + (1.0 - alpha) * task_loss(student_logits, target)


class Distiller(nn.Module):
    """``loss, student_logits = distiller(x, target)``; only the student's parameters are trained."""

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 4.0, alpha: float = 0.5,
                 task_loss: Callable = F.cross_entropy):
        super().__init__()
        self.student = student
        # Kept out of the module tree: its parameters must not reach optimizer(distiller.parameters()).
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha, self.task_loss = temperature, alpha, task_loss

    def forward(self, x, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        loss = distillation_loss(student_logits, teacher_logits, target, self.temperature, self.alpha, self.task_loss)
        return loss, student_logits
