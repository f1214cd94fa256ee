"""The corpus trainer for any ``nn.Module``: torch.func gradients, a CNN corpus, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learned_opt import tasks
from learned_opt.errors import LearnedOptError
from learned_opt.tasks import SupervisedTask
from pretrain.corpus import (
    ADAM, SGD, BatchedTrainer, CorpusConfig, RunPlan, batched_gradient, build_corpus, sample_hparams,
    train_run_reference,
)
from pretrain.store import Store


def plans_for(n_examples: int, settings, batch: int = 64, checkpoints: int = 5) -> list[RunPlan]:
    plans = []
    for i, (opt, lr, epochs) in enumerate(settings):
        hp = {**sample_hparams(i), "optimizer": opt, "lr": lr, "epochs": epochs, "batch_size": batch,
              "weight_decay": 1e-3}
        plans.append(RunPlan(i, 100 + i, hp, n_examples, num_checkpoints=checkpoints))
    return plans


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_functional_gradients_equal_the_hand_written_mlp_path(mnist_data, strategy):
    task = tasks.get("mnist-mlp")
    x, y = mnist_data.train_x[:512], mnist_data.train_y[:512]
    torch.manual_seed(0)
    params = torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(3)])
    idx = torch.randint(0, 512, (3, 32))
    fast, generic = torch.empty_like(params), torch.empty_like(params)
    batched_gradient(task, x, y, "mlp")(params, idx, fast)
    g = batched_gradient(task, x, y, strategy)
    g(params, idx, generic)
    assert g.name == strategy
    torch.testing.assert_close(generic, fast, rtol=1e-4, atol=1e-6)


def test_auto_keeps_one_strategy_and_the_mlp_path_for_mlps(mnist_data):
    x, y = mnist_data.train_x[:256], mnist_data.train_y[:256]
    assert batched_gradient(tasks.get("mnist-mlp"), x, y).name == "mlp"
    cnn = tasks.get("mnist-cnn")
    g = batched_gradient(cnn, x, y)
    params = torch.zeros(2, cnn.num_params)
    g(params, torch.randint(0, 256, (2, 8)), torch.empty_like(params))
    assert g.name in ("vmap", "loop")


def test_a_cnn_trains_in_a_batch_as_in_the_plain_pytorch_loop(mnist_data):
    task = tasks.get("mnist-cnn")
    x, y = mnist_data.train_x[:200], mnist_data.train_y[:200]  # batch 64 -> a partial last batch of 8
    plans = plans_for(len(x), [(SGD, 0.1, 1), (ADAM, 3e-3, 2)])
    finished = []
    BatchedTrainer(task, x, y, gradient="vmap").train(plans, finished.extend)
    assert sorted(r.plan.run_id for r in finished) == [0, 1]
    for run in finished:
        assert run.dropped is None and run.params.shape == (5, task.num_params)
        torch.testing.assert_close(run.params, train_run_reference(task, run.plan, x, y), rtol=1e-4, atol=2e-5)


def test_a_cnn_corpus_is_written_and_its_checkpoints_evaluated(tmp_path, mnist_data):
    config = CorpusConfig(task="mnist-cnn", runs=2, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=4,
                          progress=False, batch_runs=2)
    summary = build_corpus(config, data=mnist_data)
    store = Store.open(tmp_path)
    assert summary.written + summary.dropped == 2 and store.task_name == "mnist-cnn"
    run = store.read_run(store.run_ids()[0])
    assert run.params.shape[1] == 5130 and 2 <= run.params.shape[0] <= 4 and set(run.metrics) == {"test_loss", "test_error", "train_loss"}


class WithBatchNorm(SupervisedTask):
    name = "bn-test"

    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))

    def load_data(self, root=None, *, download=False):
        raise AssertionError("not needed")


class Frozen(WithBatchNorm):
    name = "frozen-test"

    def build_model(self):
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
        model[1].weight.requires_grad_(False)
        return model


class WrongInputs(WithBatchNorm):
    name = "wrong-inputs-test"

    def build_model(self):
        return nn.Sequential(nn.Linear(100, 10))


@pytest.mark.parametrize("task, message", [
    (WithBatchNorm(), "buffers"), (Frozen(), "do not require grad"), (WrongInputs(), "forward or loss fails"),
])
def test_models_the_trainer_cannot_train_are_refused_with_what_to_do(mnist_data, task, message):
    with pytest.raises(LearnedOptError, match=message):
        batched_gradient(task, mnist_data.train_x[:8], mnist_data.train_y[:8])


def test_eval_examples_evaluates_checkpoints_on_a_recorded_subset(tmp_path, mnist_data, mnist_root, capsys):
    from learned_opt import cli
    from learned_opt.tasks import ClassificationData

    config = CorpusConfig(task="mnist-cnn", runs=1, out=str(tmp_path / "c"), epochs=1, train_examples=128,
                          checkpoints=3, progress=False, eval_examples=200)
    assert build_corpus(config, data=mnist_data).written == 1
    store = Store.open(tmp_path / "c")
    assert store.settings["eval_examples"] == 200
    run = store.read_run(0)
    task = tasks.get("mnist-cnn")
    subset = ClassificationData(mnist_data.train_x[:200], mnist_data.train_y[:200], mnist_data.test_x[:200],
                                mnist_data.test_y[:200])
    expected = task.evaluate(run.params, subset)
    for name, values in expected.items():
        torch.testing.assert_close(run.metrics[name], values, rtol=1e-5, atol=1e-6)
    # a resume with another evaluation is refused, and so is the option on a control task
    args = ["corpus", "--task", "mnist-cnn", "--runs", "2", "--epochs", "1", "--train-examples", "128",
            "--checkpoints", "3", "--out", str(tmp_path / "c"), "--no-progress", "--eval-examples", "100",
            "--data-root", str(mnist_root)]
    assert cli.main(args) == 2 and "--eval-examples 200, not 100" in capsys.readouterr().err
    assert cli.main(["corpus", "--task", "cartpole-mlp", "--runs", "1", "--out", str(tmp_path / "p"),
                     "--eval-examples", "10"]) == 2
    assert "--eval-examples applies to classifier corpora" in capsys.readouterr().err
