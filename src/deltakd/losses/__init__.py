"""Distillation and task losses: pure functions of tensors, and the table of distillation losses.

Modules:

- ``logits``: classification / regression heads (``ce_loss``, ``kd_kl``, ``logits_mse``).
- ``lm``: causal-LM token losses (``token_kl``, ``generalized_jsd``, ``lm_ce``, ``next_token_mask``).
- ``lm_sparse``: the same KD losses against a cached top-k + tail teacher (``sparse_token_kl``,
  ``sparse_generalized_jsd``).
- ``hidden``: intermediate layers (``hidden_mse``, ``hidden_cosine``, ``attention_kl``,
  ``mean_pool``, RAIL-KD).
- ``lora``: LoRA-feature distillation (``lora_feature_mse``, ``capture_lora_a_outputs``).
- ``table``: ``LOSSES``, one ``LossSpec`` per distillation loss a recipe can name; ``inputs``
  (``LossInputs``) and ``terms`` (one compute function per table entry) serve it.

Conventions:

- Shapes: ``B`` batch, ``L`` sequence length, ``H`` hidden width, ``C`` classes, ``V`` vocabulary,
  ``A`` attention heads, ``r`` LoRA rank.
- ``mask`` is ``(B, L)``, 1/True for real tokens, 0/False for padding; masked means average over
  the unmasked tokens only.
- Nothing here detaches the teacher side: compute teacher outputs under ``torch.no_grad()`` (or
  load them from the cache). Projections that must learn (RAIL-KD heads, width projections) are
  ordinary ``nn.Module`` s passed in or held by the small heads in ``hidden``.
- Causal-LM token losses return ``sum over valid tokens / normalizer``; with the default
  normalizer (the number of valid tokens in this call) the result is the per-token mean, and the
  token-count-weighted mean of micro-batch values equals the full-batch value. Pass
  ``normalizer=num_items_in_batch`` (what the HF Trainer hands to ``compute_loss``) to make
  gradient accumulation exact.

Layering: this package imports nothing from deltakd but ``deltakd.errors``, and this file imports
no submodule, so ``deltakd.losses.table`` (read by the recipe schema) loads without torch.
"""
