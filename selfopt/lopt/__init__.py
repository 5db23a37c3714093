"""Learned optimizers: architectures with weights ``theta`` that define optax optimizers."""
from selfopt.lopt.base import LearnedOptimizer, Theta, as_optax, check_theta
from selfopt.lopt.hierarchical import HierarchicalLOpt, HierarchicalLOptState
from selfopt.lopt.learned_sgd import LearnedSGD
from selfopt.lopt.mlp_lopt import MLPLOpt, MLPLOptState
from selfopt.lopt.scheduled import ScheduledLOpt

__all__ = ["HierarchicalLOpt", "HierarchicalLOptState", "LearnedOptimizer", "LearnedSGD",
           "MLPLOpt", "MLPLOptState", "ScheduledLOpt", "Theta", "as_optax", "check_theta"]
