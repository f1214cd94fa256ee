"""One generative update on a random network, next to the usual way of training it.

``learned-opt demo --task T`` (a registered name, ``path/to/file.py:ClassName`` or
``package.module:ClassName``) runs the demo of the task's kind:

* a control task (``cartpole-mlp``, the default; needs no download): a fresh CartPole policy, one
  :meth:`GptOptimizer.generate` update, and PPO training the same init; the pole's angle over one
  episode before and after, as ``demo_cartpole-mlp.png`` (see :mod:`learned_opt.demo.cartpole`).
* a supervised task (``mnist-mlp``, ``mnist-cnn``, your own): a fresh network, one update, then
  Adam and SGD training the same init.

The supervised demo builds a fresh network of the task (PyTorch's default init, seeded), makes
one :meth:`GptOptimizer.generate` update prompted with the generator's best prompt (the closure
measures the full-test-set metric), then trains the *same* init for a few hundred steps with

* Adam, lr 1e-3, batch 128 (constant learning rate);
* SGD with G.pt's recipe: Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, cosine
  schedule over 25 epochs stepped once per epoch;

prints a short table (test loss and error of the init, the update, Adam and SGD after ``k`` steps,
and the step at which Adam first matches the update) and saves a plot and a JSON beside it.

The baselines are the plain ``nn.Module`` + ``torch.optim`` loop of
:mod:`learned_opt.baselines.supervised` (:func:`train_baseline`; PPO in :mod:`learned_opt.baselines.ppo`), so
the demo needs nothing from ``pretrain``.

Modules: ``baselines`` (Adam and SGD), ``update`` (:class:`DemoConfig`, the one update),
``mnist`` (the supervised demo, its table and plot), ``cartpole`` (the CartPole demo), ``cli``
(the arguments, and :func:`run_demo`, which runs the demo of the task's kind).
"""

from .baselines import (
    ADAM_LR,
    BASELINES,
    BATCH_SIZE,
    BaselineCurve,
    first_step_at_or_below,
    make_optimizer,
    train_baseline,
)
from .cartpole import first_step_at_or_above, format_cartpole_table, run_cartpole_demo
from .cli import configure, main, run_demo
from .mnist import format_table, plot_demo, run_supervised_demo
from .update import DEFAULT_TASK, DemoConfig, demo_optimizer, load_demo_generator, one_update

__all__ = [
    "ADAM_LR", "BASELINES", "BATCH_SIZE", "DEFAULT_TASK", "BaselineCurve", "DemoConfig", "configure",
    "demo_optimizer", "first_step_at_or_above", "first_step_at_or_below", "format_cartpole_table", "format_table",
    "load_demo_generator", "main", "make_optimizer", "one_update", "plot_demo", "run_cartpole_demo", "run_demo",
    "run_supervised_demo", "train_baseline",
]
