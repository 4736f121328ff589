"""kdsearch: hyperparameter search for knowledge distillation, built on Optuna."""

__version__ = "0.1.0"
