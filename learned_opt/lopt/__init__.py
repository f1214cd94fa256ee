"""The per-parameter learned optimizer (Metz et al. 2020 style): its rule, its weights, its Optimizer."""

from .model import hand_set_theta, init_state, update
from .optimizer import LearnedOptimizer
from .weights import LoadedRule, load_rule, rule_from_theta, save_rule

__all__ = ["LearnedOptimizer", "LoadedRule", "hand_set_theta", "init_state", "load_rule", "rule_from_theta", "save_rule", "update"]
