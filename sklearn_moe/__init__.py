"""sklearn-moe: scikit-learn compatible Mixture-of-Experts neural networks for tabular data."""

from ._classifier import MoEClassifier
from ._guard import TrainingDivergedError
from ._regressor import MoERegressor
from .callbacks import ExpertCollapseWarning
from .persistence import load

__version__ = "0.1.0"

__all__ = ["ExpertCollapseWarning", "MoEClassifier", "MoERegressor", "TrainingDivergedError", "__version__", "load"]
