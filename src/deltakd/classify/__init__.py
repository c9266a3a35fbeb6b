"""The classification family: sequence classification and regression (GLUE-style tasks, the act
classifier), fine-tuned with a delta module or distilled from a teacher."""

from .family import ClassificationFamily

__all__ = ["ClassificationFamily"]
