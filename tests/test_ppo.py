import pytest
import torch

from learned_opt import tasks
from learned_opt.baselines import ppo
from learned_opt.seeding import checkpoint_steps
from learned_opt.baselines.ppo import PPOHparams, PPOShape, train_ppo


@pytest.fixture(scope="module")
def task():
    return tasks.get("cartpole-mlp")


def inits(task, n, seed=0):
    torch.manual_seed(seed)
    return torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(n)])


def test_checkpoint_steps_keep_init_and_final():
    g = torch.Generator().manual_seed(0)
    s = checkpoint_steps(1000, 200, g)
    assert len(s) == 200 and s[0] == 0 and s[-1] == 1000
    assert (s.diff() > 0).all()
    assert torch.equal(checkpoint_steps(50, 200, g), torch.arange(51))
    assert ppo.checkpoint_steps is checkpoint_steps  # one implementation, the corpus builder's


@pytest.mark.slow
def test_batched_ppo_learns_cartpole(task):
    init = inits(task, 2)
    shape = PPOShape(envs=4, horizon=128, total_steps=8192)
    hp = PPOHparams(lr=3e-3)
    res = train_ppo(task, init, hp, shape, seed=1, num_checkpoints=20)
    assert res.checkpoints.shape == (2, 20, task.num_params)
    assert torch.equal(res.checkpoints[:, 0], init)
    assert res.env_steps[0] == 0 and res.env_steps[-1] == shape.updates * 4 * 128
    before = task.evaluate(init)["return"]
    after = task.evaluate(res.checkpoints[:, -1])["return"]
    assert before.mean() < 30
    assert after.mean() > 3 * before.mean(), (before, after)


def test_deterministic_and_leaves_the_global_rng_alone(task):
    init = inits(task, 2, seed=2)
    shape = PPOShape(envs=2, horizon=32, epochs=1, minibatches=2, total_steps=128)
    rng_before = torch.random.get_rng_state()
    a = train_ppo(task, init, PPOHparams(), shape, seed=3, num_checkpoints=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    b = train_ppo(task, init, PPOHparams(), shape, seed=3, num_checkpoints=5)
    assert torch.equal(a.checkpoints, b.checkpoints)
    assert not torch.equal(a.checkpoints[:, -1], init)


def test_runs_do_not_interact(task):
    # Changing one run's learning rate (here: freezing it) must not change its partner's path.
    init = inits(task, 2, seed=4)
    shape = PPOShape(envs=2, horizon=32, epochs=1, minibatches=2, total_steps=128)
    both = train_ppo(task, init, PPOHparams(lr=[1e-3, 3e-3]), shape, seed=0, num_checkpoints=5)
    frozen = train_ppo(task, init, PPOHparams(lr=[1e-3, 0.0]), shape, seed=0, num_checkpoints=5)
    torch.testing.assert_close(frozen.checkpoints[0], both.checkpoints[0], rtol=0, atol=1e-6)
    assert torch.equal(frozen.checkpoints[1, -1], init[1])


def test_explicit_checkpoint_steps_leave_training_unchanged(task):
    init = inits(task, 2, seed=5)
    shape = PPOShape(envs=2, horizon=32, epochs=1, minibatches=2, total_steps=128)  # 2 updates, 4 gradient steps
    drawn = train_ppo(task, init, PPOHparams(), shape, num_checkpoints=3, run_seeds=[1, 2])
    fixed = train_ppo(task, init, PPOHparams(), shape, run_seeds=[1, 2], checkpoint_at=[0, 2, 4])
    assert fixed.steps.tolist() == [[0, 2, 4]] * 2 and fixed.env_steps.tolist() == [[0, 64, 128]] * 2
    assert torch.equal(fixed.checkpoints[:, 0], init) and torch.equal(fixed.checkpoints[:, -1], drawn.checkpoints[:, -1])
    with pytest.raises(ValueError, match="checkpoint_at"):
        train_ppo(task, init, PPOHparams(), shape, checkpoint_at=[0, 5])


def test_bad_hyperparameter_count_is_refused(task):
    with pytest.raises(ValueError, match="3 values for 2 runs"):
        train_ppo(task, inits(task, 2), PPOHparams(lr=[1e-3, 1e-3, 1e-3]), PPOShape(total_steps=64))
