import numpy as np
import pytest
import torch

from learned_opt import tasks
from learned_opt.errors import EnvironmentStepError


@pytest.fixture(scope="module")
def task():
    return tasks.get("cartpole-mlp")


def policies(task, n, seed=0):
    torch.manual_seed(seed)
    return torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(n)])


def test_policy_shapes(task):
    assert task.num_params == 4 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2 == 1282
    assert task.build_model()(torch.zeros(5, 4)).shape == (5, 2)
    assert task.metric().direction == "max" and task.metric().best_prompt == 500.0


def test_return_does_not_depend_on_the_batch(task):
    flat = policies(task, 6)
    rng = torch.random.get_rng_state()
    task.evaluate(flat[:1])
    assert torch.equal(torch.random.get_rng_state(), rng)  # evaluation draws nothing
    together = task.evaluate(flat)["return"]
    alone = torch.cat([task.evaluate(flat[i : i + 1])["return"] for i in range(6)])
    assert torch.equal(together, alone)
    assert ((together >= 8) & (together <= 500)).all()


def test_return_matches_a_plain_gymnasium_rollout(task):
    import gymnasium as gym

    flat = policies(task, 3, seed=3)
    data = task.load_data()
    got = task.evaluate(flat, data)["return"]
    model = task.build_model()
    for i in range(3):
        task.layout().load_into(flat[i], list(model.parameters()))
        total = 0.0
        for start in data.start_states:
            env = gym.make("CartPole-v1")
            env.reset(seed=0)
            env.unwrapped.state = start.copy()
            obs = start.astype(np.float32)
            done = False
            while not done:
                with torch.no_grad():
                    a = int(model(torch.from_numpy(obs)[None]).argmax())
                obs, r, term, trunc, _ = env.step(a)
                total += r
                done = term or trunc
            env.close()
        assert got[i].item() == pytest.approx(total / len(data.start_states), abs=1e-4)


def test_episodes_are_capped_at_500(task):
    # A hand-made balancing controller: push toward the side the pole leans to.
    flat = torch.zeros(1, task.num_params)
    p = task.layout().unflatten(flat[0])
    p["fc1.weight"][0] = torch.tensor([0.1, 0.5, 10.0, 2.0])
    p["fc2.weight"][0, 0] = 1.0
    p["fc3.weight"][1, 0], p["fc3.weight"][0, 0] = 1.0, -1.0
    returns, angles = task.rollout(flat)
    assert (returns == 500).all()
    assert angles.shape[0] == 500


def test_permuted_policy_acts_the_same(task):
    flat = policies(task, 4, seed=1)
    perms = task.random_permutations(4, torch.Generator().manual_seed(0))
    permuted = task.permute(flat, perms)
    assert not torch.equal(permuted, flat)
    obs = torch.randn(64, 4)
    out = tasks.batched_forward(task.build_model(), task.layout(), flat, obs)
    out_p = tasks.batched_forward(task.build_model(), task.layout(), permuted, obs)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)


def test_nan_observations_raise_a_clear_error(task):
    bad = tasks.ControlData(np.full((2, 4), np.nan))
    with pytest.raises(EnvironmentStepError, match="non-finite observations"):
        task.evaluate(policies(task, 1), bad)
