"""Preprocessing travels with the generator: tasks expose their input normalisation, manifests record
it, ``list_pretrained()`` shows it; shipped manifests name their corpus instead of locating it."""

import json
from pathlib import Path

import pytest

from learned_opt import list_pretrained, load_generator, tasks
from learned_opt.errors import WeightsError
from learned_opt.manifest import read_manifest
from learned_opt.tasks.datasets import MNIST_MEAN, MNIST_STD
from pretrain.train.export import portable_command

WEIGHTS = Path(__file__).resolve().parents[1] / "learned_opt" / "weights"


def test_tasks_expose_the_normalisation_their_loaders_apply():
    assert tasks.get("mnist-mlp").input_normalization == {"mean": list(MNIST_MEAN), "std": list(MNIST_STD)}
    assert tasks.get("mnist-cnn").input_normalization == tasks.get("mnist-mlp").input_normalization
    assert len(tasks.get("cifar10-cnn").input_normalization["mean"]) == 3
    assert getattr(tasks.get("cartpole-mlp"), "input_normalization", None) is None


def test_list_pretrained_and_the_loaded_generator_show_it():
    shipped = {g["name"]: g for g in list_pretrained()}
    assert shipped["mnist-mlp"]["input_normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert shipped["cartpole-mlp"]["input_normalization"] is None
    assert load_generator("mnist-mlp").input_normalization == {"mean": [0.1307], "std": [0.3081]}


@pytest.mark.parametrize("bad", [{"mean": [0.1]}, {"mean": [0.1], "std": [0.0]}, {"mean": [0.1, 0.2], "std": [1.0]},
                                 {"mean": ["a"], "std": [1.0]}, [0.1, 0.3]])
def test_a_bad_input_normalization_is_refused(bad):
    m = json.loads((WEIGHTS / "mnist-mlp.json").read_text())
    m["input_normalization"] = bad
    with pytest.raises(WeightsError, match="input_normalization"):
        read_manifest(json.dumps(m), "test.json")


def test_shipped_manifests_hold_no_machine_paths():
    for path in WEIGHTS.glob("*.json"):  # generators and learned optimizers alike
        text = path.read_text()
        for prefix in ('"/', "/work/", "/home/", "/tmp/", "C:\\\\"):
            assert prefix not in text, f"{path.name} holds a path starting {prefix}"
        corpus = json.loads(text).get("corpus")  # a generator's corpus is named, not located
        if corpus is not None:
            assert corpus["store"] == Path(corpus["store"]).name


def test_commands_name_their_program_without_its_folder():
    assert portable_command("/home/me/.venv/bin/learned-opt train --store 'a b'") == "learned-opt train --store 'a b'"
    assert portable_command("learned-opt train") == "learned-opt train"
