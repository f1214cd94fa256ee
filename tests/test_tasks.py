import pytest
import torch
import torch.nn.functional as F

from learned_opt import DataError, DataNotFoundError, UnknownTaskError, tasks
from learned_opt.errors import ConfigError
from learned_opt.tasks.base import Task


def test_registry_lists_and_gets_tasks():
    assert "mnist-mlp" in tasks.names()
    assert tasks.get("mnist-mlp").name == "mnist-mlp"
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'.*mnist-mlp"):
        tasks.get("nope")


def test_mnist_model_matches_gpt_architecture():
    task = tasks.get("mnist-mlp")
    assert task.signature == (
        ("fc1.weight", (10, 784)),
        ("fc1.bias", (10,)),
        ("fc2.weight", (10, 10)),
        ("fc2.bias", (10,)),
    )
    assert task.num_params == 7960
    model = task.build_model()
    assert list(model.state_dict()) == [n for n, _ in task.signature]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_build_model_follows_the_global_seed():
    task = tasks.get("mnist-mlp")
    torch.manual_seed(7)
    a = task.layout().flatten_module(task.build_model())
    torch.manual_seed(7)
    b = task.layout().flatten_module(task.build_model())
    c = task.layout().flatten_module(task.build_model())
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_mnist_data_is_normalised(mnist_data):
    assert mnist_data.train_x.shape == (60000, 1, 28, 28)
    assert mnist_data.test_x.shape == (10000, 1, 28, 28)
    assert abs(mnist_data.train_x.mean().item()) < 0.01
    assert abs(mnist_data.train_x.std().item() - 1.0) < 0.01


def test_batched_evaluation_equals_one_model_at_a_time(mnist_data):
    task = tasks.get("mnist-mlp")
    layout = task.layout()
    torch.manual_seed(0)
    models = [task.build_model() for _ in range(5)]
    flat = torch.stack([layout.flatten_module(m) for m in models])
    got = task.evaluate(flat, mnist_data)
    for i, m in enumerate(models):
        with torch.no_grad():
            logits = m(mnist_data.test_x)
            loss = F.cross_entropy(logits, mnist_data.test_y).item()
            err = (logits.argmax(1) != mnist_data.test_y).float().mean().item() * 100
            train = F.cross_entropy(m(mnist_data.train_x[:10000]), mnist_data.train_y[:10000]).item()
        assert got["test_loss"][i].item() == pytest.approx(loss, rel=1e-5)
        assert got["test_error"][i].item() == pytest.approx(err, abs=1e-3)
        assert got["train_loss"][i].item() == pytest.approx(train, rel=1e-5)
    # a random init sits near chance
    assert (got["test_error"] > 70).all()


def test_evaluate_rejects_unknown_metric(mnist_data):
    task = tasks.get("mnist-mlp")
    with pytest.raises(UnknownTaskError, match="no metric 'accuracy'"):
        task.evaluate(torch.zeros(1, task.num_params), mnist_data, metrics=["accuracy"])


def test_permuted_network_computes_the_same_outputs():
    task = tasks.get("mnist-mlp")
    layout = task.layout()
    torch.manual_seed(1)
    flat = torch.stack([layout.flatten_module(task.build_model()) for _ in range(4)])
    perms = task.random_permutations(4, torch.Generator().manual_seed(0))
    permuted = task.permute(flat, perms)
    assert not torch.equal(permuted, flat)
    x = torch.randn(32, 1, 28, 28)
    out = tasks.batched_forward(task.build_model(), layout, flat, x)
    out_p = tasks.batched_forward(task.build_model(), layout, permuted, x)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)
    # hidden units really moved: the first layer's rows are a permutation of the original's
    w, wp = layout.unflatten(flat)["fc1.weight"], layout.unflatten(permuted)["fc1.weight"]
    assert torch.equal(wp[0], w[0][perms[0][0]])


def test_missing_data_root_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LEARNED_OPT_DATA", raising=False)
    task = tasks.get("mnist-mlp")
    with pytest.raises(DataNotFoundError, match="LEARNED_OPT_DATA"):
        task.load_data(None)
    with pytest.raises(DataNotFoundError, match="MNIST not found under"):
        task.load_data(tmp_path)


@pytest.mark.parametrize("damage, match", [
    (lambda raw: raw.joinpath("train-images-idx3-ubyte").write_bytes(
        raw.joinpath("train-images-idx3-ubyte").read_bytes()[:1_000_000]), "training split .*cannot be read"),
    (lambda raw: raw.joinpath("train-labels-idx1-ubyte").write_bytes(b""), "training split .*cannot be read"),
    (lambda raw: raw.joinpath("train-labels-idx1-ubyte").write_bytes(
        raw.joinpath("t10k-labels-idx1-ubyte").read_bytes()), "60000 images and 10000 labels, where it holds 60000"),
    (lambda raw: [raw.joinpath(f"train-{k}").write_bytes(raw.joinpath(f"t10k-{k}").read_bytes())
                  for k in ("images-idx3-ubyte", "labels-idx1-ubyte")], "10000 images and 10000 labels, where it holds 60000"),
    (lambda raw: raw.joinpath("t10k-labels-idx1-ubyte").write_bytes(
        raw.joinpath("t10k-labels-idx1-ubyte").read_bytes()[:-1] + bytes([200])), "test split .*labels from 0 to 200"),
    (lambda raw: raw.joinpath("t10k-labels-idx1-ubyte").unlink(), "split .*cannot be read .*Dataset not found.*missing"),
])
def test_a_damaged_mnist_folder_says_which_split_and_what_to_do(mnist_root, tmp_path, damage, match):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    damage(raw)
    with pytest.raises(DataError, match=f"{match}.*replace the folder's files"):
        tasks.get("mnist-mlp").load_data(tmp_path)


def test_mnist_output_divergence_is_zero_for_the_same_network_and_differentiable(mnist_data):
    task = tasks.get("mnist-mlp")
    inputs = task.matching_inputs(mnist_data)
    assert inputs.shape[0] == 55_000  # the validation holdout never enters training
    torch.testing.assert_close(inputs[-1], mnist_data.train_x[54_999])
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, task.num_params, generator=gen) * 0.1 for _ in range(2))
    same = task.output_divergence(a, a, inputs[:64])
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    b.requires_grad_(True)
    diff = task.output_divergence(b, a, inputs[:64])
    assert diff.shape == (3,) and (diff > 0).all()
    diff.sum().backward()
    assert b.grad.abs().sum() > 0


def test_mnist_excess_loss_is_the_hinge_of_the_cross_entropy_difference(mnist_data):
    task = tasks.get("mnist-mlp")
    inputs, labels = task.matching_inputs(mnist_data)[:128], task.matching_labels(mnist_data)[:128]
    every = task.matching_labels(mnist_data)
    assert every.shape == (55_000,) and torch.equal(every[-1], mnist_data.train_y[54_999])
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(4, task.num_params, generator=gen) * 0.1 for _ in range(2))
    ab, ba = task.excess_loss(a, b, inputs, labels), task.excess_loss(b, a, inputs, labels)
    ce = lambda flat: F.cross_entropy(task.logits(flat, inputs).transpose(1, 2), labels.expand(len(flat), -1),  # noqa: E731
                                      reduction="none").mean(-1)
    torch.testing.assert_close(ab - ba, ce(a) - ce(b), rtol=1e-5, atol=1e-6)  # one of the two is the difference
    assert (ab * ba == 0).all() and (ab + ba > 0).all()
    torch.testing.assert_close(task.excess_loss(a, a, inputs, labels), torch.zeros(4), atol=1e-6, rtol=0)
    worse = a.clone().requires_grad_(True)
    excess = task.excess_loss(worse, b, inputs, labels)
    excess.sum().backward()  # the gradient reaches the predicted network where it is worse, and only there
    rows_with_grad = worse.grad.abs().sum(-1) > 0
    assert torch.equal(rows_with_grad, excess.detach() > 0)


def test_a_control_task_has_no_labels_for_the_hinge():
    task = tasks.get("cartpole-mlp")
    with pytest.raises(ConfigError, match="--label-hinge"):
        task.matching_labels(task.load_data())


def test_cartpole_output_divergence_compares_action_distributions_on_fixed_states():
    task = tasks.get("cartpole-mlp")
    inputs = task.matching_inputs(task.load_data())
    assert inputs.shape == (20_000, 4) and torch.equal(inputs, task.matching_inputs(task.load_data()))
    assert (inputs.abs().amax(0) <= torch.tensor([2.4, 2.0, 0.2095, 2.0])).all()
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, task.num_params, generator=gen) for _ in range(2))
    logits = task.logits(a, inputs[:5])
    model = task.build_model()
    torch.nn.utils.vector_to_parameters(a[1], model.parameters())
    torch.testing.assert_close(logits[1], model(inputs[:5]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.output_divergence(a, a, inputs[:64]), torch.zeros(2), atol=1e-6, rtol=0)
    assert (task.output_divergence(b, a, inputs[:64]) > 0).all()


def test_a_control_task_without_a_matching_box_says_so():
    class NoBox(type(tasks.get("cartpole-mlp"))):
        matching_box = None

    with pytest.raises(ConfigError, match="matching_box"):
        NoBox().matching_inputs(None)
    with pytest.raises(ConfigError, match="no inputs to match"):
        Task.matching_inputs(NoBox(), None)


def test_cifar10_missing_is_not_found_and_a_damaged_copy_is_a_data_error(tmp_path):
    task = tasks.get("cifar10-cnn")
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found under"):
        task.load_data(tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")  # torchvision: "not found or corrupted"
    with pytest.raises(DataError, match="CIFAR-10's training split .*cannot be read .*replace the folder's files"):
        task.load_data(tmp_path)
