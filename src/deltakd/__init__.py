"""deltakd: parameter-efficient fine-tuning, knowledge distillation and delta-module transfer."""

__version__ = "0.1.0"
