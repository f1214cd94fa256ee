"""The baselines a generative update is compared with, one of each kind of task: batched PPO
(:mod:`learned_opt.baselines.ppo`) for control tasks."""
