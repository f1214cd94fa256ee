"""Baselines: the usual ways of training a task's network, next to which generative updates are measured."""
