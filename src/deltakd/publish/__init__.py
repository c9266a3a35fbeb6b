"""Outputs that travel: the model card of a run's ``model/`` and pushing it to the Hugging Face Hub."""

from .card import render_card, write_card
from .push import push_run

__all__ = ["push_run", "render_card", "write_card"]
