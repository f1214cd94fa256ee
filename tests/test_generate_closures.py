"""``generate`` takes torch's usual loss closure (one that calls ``backward()``) as well as a metric
closure; the parameters' gradients are left as they were."""

import torch
import torch.nn.functional as F

from learned_opt import GptOptimizer
from learned_opt.tasks import MLP


def _model_and_batch():
    torch.manual_seed(0)
    model = MLP((784, 10, 10))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    return model, x, y


def test_generate_accepts_the_usual_loss_closure_and_keeps_gradients():
    model, x, y = _model_and_batch()
    opt = GptOptimizer(model.parameters(), generator="mnist-mlp", seed=0)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def closure():  # what step(closure) takes: zero_grad, forward, backward, return the loss
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    report = opt.generate(closure)
    assert report.metric_before is not None and isinstance(report.metric_before, float)
    assert report.metric_after is not None
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_a_closure_returning_a_loss_with_grad_is_detached():
    model, x, y = _model_and_batch()
    opt = GptOptimizer(model.parameters(), generator="mnist-mlp", seed=0)

    def closure():
        with torch.enable_grad():
            return F.cross_entropy(model(x), y)

    report = opt.generate(closure)
    assert isinstance(report.metric_before, float)
    assert all(p.grad is None for p in model.parameters())


def test_named_parameters_and_parameters_of_one_model_are_alike():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
    by_name = GptOptimizer(model.named_parameters(), generator="mnist-mlp", seed=0)
    plain = GptOptimizer(model.parameters(), generator="mnist-mlp", seed=0)
    assert [p.shape for p in by_name.params] == [p.shape for p in plain.params]
