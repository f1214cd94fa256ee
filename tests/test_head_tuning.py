"""``learned-opt tune-head``: the property head fine-tuned to rank one update's samples."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_demo import save_tiny_mnist_generator
from test_self_ranking import ranking_generator

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.errors import ConfigError
from learned_opt.pretrained import save_generator
from learned_opt.pretrained import load_generator
from pretrain.head_tuning import HeadTuneConfig, ranking_figures, train_head


def test_ranking_figures_of_a_perfect_and_a_reversed_order():
    truth = torch.tensor([[0.3, 0.1, 0.2], [1.0, 3.0, 2.0], [0.5, 0.6, 0.4]])  # [G, S]
    error = truth * 10
    right = ranking_figures(truth.clone(), {"loss": truth, "error": error}, "loss", "min")
    assert right["within_group_spearman"] == pytest.approx(1.0)
    assert right["loss"]["head_pick_median"] == right["loss"]["best_of_group_median"] == pytest.approx(0.4)
    assert right["loss"]["one_sample_median"] == pytest.approx(0.5)  # the first sample of each group
    assert right["error"]["head_pick_median"] == pytest.approx(4.0)  # the same pick, read in another metric
    wrong = ranking_figures(-truth, {"loss": truth}, "loss", "min")
    assert wrong["within_group_spearman"] == pytest.approx(-1.0)
    assert wrong["loss"]["head_pick_median"] == pytest.approx(0.6)  # the worst of each group
    up = ranking_figures(truth.clone(), {"ret": truth}, "ret", "max")  # higher is better: the head's highest is picked
    assert up["ret"]["head_pick_median"] == pytest.approx(up["ret"]["best_of_group_median"]) == pytest.approx(0.6)


def within(gen, theta, labels) -> float:
    pred = gen.predict_metric(theta.flatten(0, 1)).view(labels.shape)
    rows = [torch.corrcoef(torch.stack([p.argsort().argsort().float(), y.argsort().argsort().float()]))[0, 1]
            for p, y in zip(pred, labels)]
    return float(torch.stack(rows).mean())


def test_train_head_learns_the_order_within_groups_and_changes_nothing_else():
    gen = ranking_generator()
    torch.manual_seed(1)
    p = gen.layout.num_params
    theta = torch.randn(48, 6, p) * 0.5  # [G, S, P]
    w = torch.randn(p)
    labels = 1.0 + 0.3 * torch.tanh(theta @ w / p**0.5)  # an order the head can read from θ
    gen.model.requires_grad_(False).eval()  # as load_generator leaves it
    others = {k: v.clone() for k, v in gen.model.state_dict().items() if not k.startswith("property_head.")}
    head_before = {k: v.clone() for k, v in gen.model.state_dict().items() if k.startswith("property_head.")}
    before = within(gen, theta, labels)
    config = HeadTuneConfig(generator="toy", epochs=40, batch_groups=8, lr=3e-3, samples=6, groups=48,
                            sample_batch=64, progress=False)
    calls = []
    log = train_head(gen, theta, labels, config, check=lambda: calls.append(1) or {"checked": True})
    after = within(gen, theta, labels)
    assert after > 0.8 > before + 0.3, (before, after)
    assert len(log) == len(calls) == 40 and log[-1]["checked"] and log[-1]["loss"] < log[0]["loss"]
    state = gen.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in others.items())  # the encoder and the diffusion model untouched
    assert any(not torch.equal(state[k], v) for k, v in head_before.items())
    assert not any(q.requires_grad for q in gen.model.parameters()) and not gen.model.property_head.training


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 1}, "--samples must be >= 2"),
    ({"groups": 0}, "--groups must be an integer >= 1"),
    ({"epochs": True}, "--epochs must be an integer >= 1"),
    ({"lr": 0.0}, "--lr must be a finite number > 0"),
    ({"lr": float("inf")}, "--lr must be a finite number > 0"),  # trained, then refused at the save
    ({"mse_weight": float("inf")}, "--mse-weight one >= 0"),
    ({"name": "../x"}, "--name '../x' must be a plain file name"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        HeadTuneConfig(generator="g", **kwargs)


def test_a_generator_without_a_head_is_refused_in_one_line(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    code = cli_main(["tune-head", "--generator", str(manifest), "--data-root", str(mnist_root), "--out",
                     str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "has no property head to tune" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tune_head_end_to_end_writes_a_generator_that_differs_only_in_its_head(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    source = json.loads(manifest.read_text())
    source["sampling"] = {"method": "ddim", "steps": 2, "t_min": 10}
    lo, hi = source["metric_range"]  # a fine-tune's prompt range, wider than its normalisation's
    source["metric_range"], source["best_prompt"] = [lo / 2, hi], lo / 2
    manifest.write_text(json.dumps(source))
    out = tmp_path / "tuned"
    code = cli_main(["tune-head", "--generator", str(manifest), "--data-root", str(mnist_root), "--out", str(out),
                     "--groups", "6", "--samples", "3", "--check-groups", "4", "--epochs", "2",
                     "--label-examples", "500", "--name", "tuned", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "within-group Spearman" in printed and "test_error, head picks" in printed
    tuned = load_generator(out / "tuned.json")
    assert tuned.sampling["steps"] == 2 and tuned.sampling["t_min"] == 10  # the source's sampler carried over
    assert tuned.metric_range == (lo / 2, hi) and tuned.best_prompt == lo / 2  # and its prompt range
    record = tuned.manifest["training"]["head_tuning"]
    assert record["source"]["sha256"] == source["weights_sha256"] and record["config"]["groups"] == 6
    a, b = load_file(str(manifest.with_suffix(".safetensors"))), load_file(str(out / "tuned.safetensors"))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("property_head.") for k in changed)
    result = json.loads((out / "head.json").read_text())
    assert len(result["log"]) == 2 and set(result["before"]) == set(result["after"]) - {"epoch", "loss"}
    assert (out / "head.png").stat().st_size > 1000
    source_gen = load_generator(manifest)  # the same noise gives the same samples: only the head differs
    theta = torch.randn(3, source_gen.layout.num_params) * 0.05
    metric, prompt = torch.full((3,), 2.3), torch.full((3,), 0.5)
    draws = [g.sample(theta, metric, prompt, generator=torch.Generator().manual_seed(7)) for g in (source_gen, tuned)]
    assert torch.equal(*draws)
    # run again into the same place: the tuned generator there is not the source, so it may be replaced;
    # naming the source's own folder and name is refused before anything is drawn
    code = cli_main(["tune-head", "--generator", str(manifest), "--data-root", str(mnist_root), "--out",
                     str(manifest.parent), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is the generator being tuned" in err and "--out or --name" in err


def test_labelling_data_is_apart_from_validation_and_test_data(mnist_data):
    task = tasks.get("mnist-mlp")
    val = task.validation_data(mnist_data, 5000)
    lab = task.labelling_data(mnist_data, 5000, 2000)
    n = mnist_data.train_x.shape[0]
    assert torch.equal(lab.test_x, mnist_data.train_x[n - 7000:n - 5000])  # just before the validation holdout
    assert torch.equal(val.test_x, mnist_data.train_x[n - 5000:])
    with pytest.raises(ConfigError, match="labelling examples must be an integer between 1 and 54999"):
        task.labelling_data(mnist_data, 5000, 55_000)
    cart = tasks.get("cartpole-mlp")
    data = cart.load_data()
    starts = [set(map(str, d.start_states.tolist())) for d in (data, cart.validation_data(data), cart.labelling_data(data))]
    assert not (starts[2] & starts[0]) and not (starts[2] & starts[1])


def test_too_many_label_examples_name_the_option(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    code = cli_main(["tune-head", "--generator", str(manifest), "--data-root", str(mnist_root), "--out",
                     str(tmp_path / "out"), "--label-examples", "60000", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--label-examples: labelling examples must be an integer between 1 and 54999" in err


def test_train_head_leaves_the_head_as_it_found_it_when_interrupted():
    gen = ranking_generator()
    gen.model.requires_grad_(False).eval()
    theta, labels = torch.randn(4, 3, gen.layout.num_params), torch.rand(4, 3)

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head(gen, theta, labels, HeadTuneConfig(generator="toy", epochs=3, samples=3, progress=False), stop)
    assert not any(q.requires_grad for q in gen.model.parameters()) and not gen.model.property_head.training


def test_tune_head_never_writes_over_its_source_or_another_job_s_generator(tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    sha = json.loads(manifest.read_text())["weights_sha256"]
    base = ["tune-head", "--data-root", str(tmp_path / "no-data"), "--no-progress", "--no-plots"]
    # the source's manifest renamed: the export's weights file would be the source's own
    renamed = manifest.with_name("v1.json")
    manifest.rename(renamed)
    weights = renamed.parent / "tiny-mnist.safetensors"  # the name the source was saved under
    before = weights.read_bytes()
    assert cli_main(base + ["--generator", str(renamed), "--out", str(renamed.parent)]) == 2
    assert "is the generator being tuned" in capsys.readouterr().err and weights.read_bytes() == before
    # another generator's tuned export (head.json beside it or not) is not this job's to replace
    out = tmp_path / "tuned"
    out.mkdir()
    theirs = {"training": {"head_tuning": {"source": {"name": "other", "sha256": "f" * 64}}}}
    (out / "tuned.json").write_text(json.dumps(theirs))
    (out / "head.json").write_text("{}\n")
    argv = base + ["--generator", str(renamed), "--out", str(out), "--name", "tuned"]
    assert cli_main(argv) == 2 and "this job did not write" in capsys.readouterr().err
    assert json.loads((out / "tuned.json").read_text()) == theirs
    # weights with no manifest beside them (a copy half made, another job's) are not replaced either
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "tuned.safetensors").write_bytes(b"someone's weights")
    assert cli_main(base + ["--generator", str(renamed), "--out", str(stray), "--name", "tuned"]) == 2
    assert "tuned.safetensors is there without its manifest" in capsys.readouterr().err
    assert (stray / "tuned.safetensors").read_bytes() == b"someone's weights"
    # an earlier tune-head of this generator is its own, even when it was stopped before head.json
    (out / "head.json").unlink()
    (out / "tuned.json").write_text(json.dumps({"training": {"head_tuning": {"source": {"sha256": sha}}}}))
    assert cli_main(argv) == 2  # past the export check, on to the data, which is missing
    err = capsys.readouterr().err
    assert "this job did not write" not in err and "no-data" in err, err


def test_a_rerun_killed_before_its_report_leaves_no_earlier_report_beside_its_generator(mnist_root, tmp_path,
                                                                                         monkeypatch):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    out = tmp_path / "tuned"
    argv = ["tune-head", "--generator", str(manifest), "--data-root", str(mnist_root), "--out", str(out),
            "--groups", "4", "--samples", "2", "--check-groups", "2", "--epochs", "1", "--label-examples", "200",
            "--name", "tuned", "--no-progress", "--no-plots"]
    assert cli_main(argv) == 0 and json.loads((out / "head.json").read_text())["config"]["epochs"] == 1
    import pretrain.head_tuning as head_tuning

    def killed_after_the_generator(*args, **kwargs):
        save_generator(*args, **kwargs)
        raise KeyboardInterrupt  # the kill comes before the report is written

    monkeypatch.setattr(head_tuning, "save_generator", killed_after_the_generator)
    assert cli_main([*argv, "--epochs", "2"]) == 130  # the last --epochs is the one taken
    assert json.loads((out / "tuned.json").read_text())["training"]["head_tuning"]["config"]["epochs"] == 2
    assert not (out / "head.json").exists()  # not the first run's, beside the second's generator
