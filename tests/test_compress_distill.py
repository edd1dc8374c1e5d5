"""lowbit.compress.distill: the loss is the formula, the T^2 keeps gradient scale, only the
student learns, and a student distilled in an ordinary loop gets close to its teacher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.compress import pruning
from lowbit.compress.distill import Distiller, distillation_loss


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: on a shared 2-core machine, thread hand-offs cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def test_loss_is_the_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, a = 3.0, 0.7
    pt, ps = F.softmax(t / T, -1), F.softmax(s / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(s, t, y, T, a), want, rtol=1e-5, atol=1e-6)
    assert float(distillation_loss(t, t, None, T)) == pytest.approx(0.0, abs=1e-6)


def test_temperature_squared_keeps_gradient_scale():
    # for large T the soft gradient tends to (s - t) / (C * batch) whatever T is, thanks to T^2
    torch.manual_seed(0)
    t = torch.randn(4, 10) * 0.1
    grads = []
    for T in (20.0, 80.0):
        s = (torch.randn(4, 10) * 0.1).requires_grad_()
        torch.manual_seed(1)
        s.data = torch.randn(4, 10) * 0.1
        distillation_loss(s, t, None, T).backward()
        grads.append(s.grad.norm())
    assert float(grads[0] / grads[1]) == pytest.approx(1.0, abs=0.02)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_distill_a_pruned_student_in_a_loop():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    student = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    student.load_state_dict(teacher.state_dict())
    pruning.magnitude_prune(student, 0.8, scope="layer")
    kd = Distiller(teacher, student, temperature=2.0, alpha=1.0)
    assert all(p is not q for p in kd.parameters() for q in teacher.parameters())
    teacher_before = [p.clone() for p in teacher.parameters()]
    x = torch.randn(512, 8)

    def gap():
        with torch.no_grad():
            return float(distillation_loss(student(x), teacher(x), None, 2.0))

    start = gap()
    opt = torch.optim.Adam(kd.parameters(), lr=1e-2)
    for i in range(60):
        loss, logits = kd(x[(i % 8) * 64:(i % 8 + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() < 0.3 * start
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert pruning.sparsity(student) == pytest.approx(0.8, abs=0.01)  # masks held during distillation
