"""The causal-LM family: language models trained from scratch on text, fine-tuned, or distilled
into a student with fewer layers initialised from the teacher (``partial_kd``)."""

from .family import CausalLMFamily

__all__ = ["CausalLMFamily"]
