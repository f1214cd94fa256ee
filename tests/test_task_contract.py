"""The contract every task keeps: each registered task and user tasks loaded from files.

Seeded build, parameter order, permutation invariance, batched evaluation equal to one network at
a time, and validation data that is not the test data. CIFAR-10 is not on these machines:
``cifar10-cnn`` is fed ``torchvision.datasets.FakeData`` of CIFAR-10's shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learned_opt import tasks
from learned_opt.errors import DataNotFoundError
from learned_opt.tasks import ClassificationData, ControlData, tensors_from
from learned_opt.tasks.datasets import CIFAR10_MEAN, CIFAR10_STD

from conftest import REPO, data_root

USER_TASKS = [f"{REPO}/examples/custom_mlp.py:Mnist32", f"{REPO}/examples/custom_cnn.py:SmallCNN",
              f"{REPO}/tests/layernorm_task.py:LayerNormMLP"]  # the last declares its symmetry by hand
TASKS = tasks.names() + USER_TASKS


def fake_cifar10(n_train: int = 600, n_test: int = 200) -> ClassificationData:
    from torchvision.datasets import FakeData

    train = FakeData(n_train, (3, 32, 32), 10, random_offset=0)
    test = FakeData(n_test, (3, 32, 32), 10, random_offset=n_train)
    return ClassificationData(*tensors_from(train, CIFAR10_MEAN, CIFAR10_STD),
                              *tensors_from(test, CIFAR10_MEAN, CIFAR10_STD))


_DATA: dict[str, object] = {}


def small_data(task):
    """The task's data, cut to a few hundred examples (supervised) so every check stays quick."""
    if task.name not in _DATA:
        try:
            data = task.load_data(data_root())
        except DataNotFoundError:
            data = fake_cifar10()
        if isinstance(data, ClassificationData):
            data = ClassificationData(data.train_x[:600], data.train_y[:600], data.test_x[:200], data.test_y[:200])
        _DATA[task.name] = data
    return _DATA[task.name]


def inputs_of(task, data) -> torch.Tensor:
    if isinstance(data, ClassificationData):
        return data.test_x[:32]
    return task.matching_inputs(data)[:32]


def seeded(task, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return task.layout().flatten_module(task.build_model())


@pytest.fixture(params=TASKS, ids=lambda r: r.rsplit("/", 1)[-1])
def task(request):
    return tasks.get(request.param)


def test_build_is_seeded(task):
    a, b = seeded(task, 3), seeded(task, 3)
    assert torch.equal(a, b) and not torch.equal(a, seeded(task, 4))
    assert task.kind in ("supervised", "control")


def test_parameters_follow_the_signature_order(task):
    model = task.build_model()
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == list(task.signature)
    flat = task.layout().flatten_module(model)
    assert flat.shape == (task.num_params,)
    for (name, p), (name2, view) in zip(model.named_parameters(), task.layout().unflatten(flat).items()):
        assert name == name2 and torch.equal(p.detach(), view)


def test_permuted_networks_compute_the_same_outputs(task):
    data = small_data(task)
    x = inputs_of(task, data)
    flat = torch.stack([seeded(task, s) for s in (0, 1)])
    perms = task.random_permutations(2, torch.Generator().manual_seed(0))
    assert any(not torch.equal(p, torch.arange(p.shape[-1])) for p in perms[0:1] for p in p)
    permuted = task.permute(flat, perms)
    assert not torch.equal(permuted, flat)
    torch.testing.assert_close(task.logits(permuted, x), task.logits(flat, x), rtol=1e-4, atol=1e-5)
    # the neuron layout's tokens of a group are the same values, reordered
    layout = task.layout(scheme="neuron")
    tokens, tokens_p = layout.to_tokens(flat), layout.to_tokens(permuted)
    assert tokens.shape[-2] == layout.num_tokens and layout.num_groups >= 2
    torch.testing.assert_close(layout.from_tokens(tokens_p), permuted)


def test_logits_match_the_module(task):
    data = small_data(task)
    x = inputs_of(task, data)[:8]
    model = task.build_model()
    flat = task.layout().flatten_module(model)[None]
    with torch.no_grad():
        torch.testing.assert_close(task.logits(flat, x)[0], model(x), rtol=1e-4, atol=1e-5)


def test_batched_evaluation_equals_one_at_a_time(task):
    data = small_data(task)
    flat = torch.stack([seeded(task, s) for s in range(3)])
    together = task.evaluate(flat, data)
    for i in range(3):
        alone = task.evaluate(flat[i : i + 1], data)
        for name, values in together.items():
            torch.testing.assert_close(values[i : i + 1], alone[name], rtol=1e-4, atol=1e-5)
    assert set(together) == set(task.metrics)


def test_validation_data_is_not_test_data(task):
    data = small_data(task)
    val = task.validation_data(data, 100) if isinstance(data, ClassificationData) else task.validation_data(data)
    if isinstance(data, ClassificationData):
        assert torch.equal(val.test_x, data.train_x[-100:]) and val.train_x.shape[0] == data.train_x.shape[0] - 100
        assert not any(torch.equal(val.test_x[:1], data.test_x[i : i + 1]) for i in range(len(data.test_x)))
    else:
        assert isinstance(val, ControlData)
        assert not np.array_equal(val.start_states, data.start_states)


@pytest.mark.slow
def test_corpus_generator_and_update_round_trip(task, tmp_path):
    """A 2-run corpus, a tiny generator trained on it, and one GptOptimizer update of a fresh model."""
    from learned_opt import GptOptimizer, load_generator
    from pretrain.corpus import CorpusConfig, build_corpus
    from pretrain.train import TrainConfig, train

    data = small_data(task)
    quick = dict(epochs=1, train_examples=256) if task.kind == "supervised" else dict(env_steps=1024)
    summary = build_corpus(CorpusConfig(task=task, runs=2, out=str(tmp_path / "c"), checkpoints=4, progress=False,
                                        **quick), data=data)
    assert summary.written == 2
    result = train(TrainConfig(store=str(tmp_path / "c"), out=str(tmp_path / "g"), preset="tiny", steps=2,
                               batch_size=4, warmup=1, log_every=1, eval_every=2, eval_batches=1, diffusion_steps=10,
                               tokens="neuron", heldout_fraction=0.5))
    assert result.manifest is not None and result.manifest.name == f"{task.name}.json"
    assert load_generator(result.manifest).layout == task.layout(scheme="neuron")  # its symmetry travels with it
    torch.manual_seed(0)
    model = task.build_model()
    before = task.layout().flatten_module(model)
    opt = GptOptimizer(model.parameters(), generator=str(result.manifest), lr=1e-3)
    val = task.validation_data(data, 100) if task.kind == "supervised" else task.validation_data(data)
    metric = opt.generator.metric_name

    def measured() -> float:  # the generator's metric on validation data, as a user's closure would
        return float(task.evaluate(task.layout().flatten_module(model)[None], val, [metric])[metric][0])

    report = opt.generate(measured)
    after = task.layout().flatten_module(model)
    assert report.accepted == (not torch.equal(before, after)) and report.metric_before == pytest.approx(
        task.evaluate(before[None], val, [metric])[metric][0].item())
    assert torch.isfinite(after).all()
