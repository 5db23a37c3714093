"""The self-training population: learned optimizers that update each other, under PBT."""
from selfopt.population.pbt import (
    PBT,
    Hyperparams,
    replace_failed,
    score_members,
)
from selfopt.population.self_training import POLICIES, AdamControl, OuterOptimizer, SelfTraining

__all__ = ["PBT", "POLICIES", "AdamControl", "Hyperparams", "OuterOptimizer",
           "SelfTraining", "replace_failed", "score_members"]
