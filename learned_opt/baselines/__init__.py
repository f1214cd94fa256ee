"""The baselines a generative update is compared with, one of each kind of task:
:mod:`learned_opt.baselines.supervised` (one network, ``torch.optim`` Adam or G.pt's SGD recipe)
for supervised tasks, and :mod:`learned_opt.baselines.ppo` (batched PPO) for control tasks."""
