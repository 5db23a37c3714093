"""Inner problems (tasks) for learned optimizers, and the distribution they are drawn from."""
from selfopt.tasks.augmentation import Reparametrized
from selfopt.tasks.autoencoder import Autoencoder
from selfopt.tasks.base import Task, static_field, task_dataclass
from selfopt.tasks.classifiers import ConvNetClassifier, LogisticRegression, MLPClassifier
from selfopt.tasks.distribution import (
    FAMILIES,
    HELDOUT_CONFIGS,
    HELDOUT_FAMILIES,
    HELDOUT_SEED_START,
    TEST_CONFIGS,
    TEST_HORIZON,
    TEST_SEED_START,
    TRAIN_FAMILIES,
    COMPACT_GRIDS,
    GRIDS,
    TRAIN_GRIDS,
    TaskDistribution,
    full_config,
    make_task,
)
from selfopt.tasks.language_model import LanguageModel
from selfopt.tasks.lopt_training import LOptTraining
from selfopt.tasks.quadratic import Quadratic
from selfopt.tasks.regression import TeacherRegression
from selfopt.tasks.test_functions import TEST_FUNCTIONS, TestFunction

__all__ = [
    "FAMILIES",
    "HELDOUT_CONFIGS",
    "HELDOUT_FAMILIES",
    "HELDOUT_SEED_START",
    "TEST_CONFIGS",
    "TEST_FUNCTIONS",
    "TEST_HORIZON",
    "TEST_SEED_START",
    "TRAIN_FAMILIES",
    "COMPACT_GRIDS",
    "GRIDS",
    "TRAIN_GRIDS",
    "Autoencoder",
    "Reparametrized",
    "ConvNetClassifier",
    "LanguageModel",
    "LOptTraining",
    "LogisticRegression",
    "MLPClassifier",
    "Quadratic",
    "Task",
    "TaskDistribution",
    "TeacherRegression",
    "TestFunction",
    "full_config",
    "make_task",
    "static_field",
    "task_dataclass",
]
