"""Bottleneck (factorised) token embedding of a student: build, SVD-align, multiply out.

Stage 2 of Ding et al. 2022 ("Multi-stage Distillation Framework for Cross-Lingual Semantic
Similarity Matching"), after ALBERT (Lan et al. 2020): the token embedding ``(V, H)`` becomes
``Embedding(V, d)`` followed by ``Linear(d, H)``; ``V*H`` parameters -> ``V*d + d*H + H``
(MiniLM-L6: 11.7M -> 3.96M at d = 128). ``align_bottleneck`` initialises it from a pretrained
embedding matrix by truncated SVD of the mean-centred matrix (PCA): the bias is the mean row and
the rank-d product is the best rank-d approximation in Frobenius norm (Eckart-Young), so the
initial ``proj(small(ids))`` is the best affine rank-d fit of the pretrained rows; exact when
``d >= rank(W - mean)``. The module itself, ``BottleneckEmbedding``, is in ``structure``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..errors import DeltakdError
from .structure import BottleneckEmbedding, input_embeddings, sync_spec

__all__ = ["add_embedding_bottleneck", "align_bottleneck", "bottleneck_student", "materialize"]


def add_embedding_bottleneck(model: PreTrainedModel, dim: int, bias: bool = True) -> BottleneckEmbedding:
    """Replace ``model``'s token embedding (V, H) by a random ``BottleneckEmbedding`` (V, d -> H),
    in place; returns the new module (initialise it with ``align_bottleneck``)."""
    emb = input_embeddings(model)
    if isinstance(emb, BottleneckEmbedding):
        raise DeltakdError(f"{type(model).__name__}: the token embedding is already a bottleneck")
    if not isinstance(emb, nn.Embedding):
        raise DeltakdError(f"{type(model).__name__}: input embeddings are {type(emb).__name__}, not nn.Embedding")
    if model.get_output_embeddings() is not None:
        raise DeltakdError(f"{type(model).__name__}: has an output embedding (LM head) tied to the input one; "
                           "use the bare encoder (e.g. BertModel) for a bottleneck student")
    new = BottleneckEmbedding(emb.num_embeddings, dim, emb.embedding_dim, padding_idx=emb.padding_idx, bias=bias)
    new.to(device=emb.weight.device, dtype=emb.weight.dtype)
    model.set_input_embeddings(new)
    sync_spec(model)
    return new


@torch.no_grad()
def align_bottleneck(student: PreTrainedModel | BottleneckEmbedding, pretrained: PreTrainedModel | Tensor) -> float:
    """Initialise the student's bottleneck so that ``proj(small(ids))`` best approximates the
    pretrained embedding matrix ``W`` (V, H); returns the relative error ``||W - W_hat||_F / ||W||_F``.

    Truncated SVD of the centred matrix ``W - 1 mu^T = U S V^T``: ``small.weight = U_d S_d``
    (V, d), ``proj.weight = V_d`` (H, d), ``proj.bias = mu`` (H); computed in float64, with
    ``V_d`` from the eigenvectors of the (H, H) Gram matrix and ``U_d S_d = (W - mu) V_d``.
    This is the best rank-d affine fit (PCA; Eckart-Young on the centred rows), exact when
    ``d >= rank(W - mu)``; extra columns beyond ``min(V, H)`` are zero. Without a projection bias
    the uncentred SVD is used (best rank-d linear fit).
    """
    bottleneck = student if isinstance(student, BottleneckEmbedding) else input_embeddings(student)
    if not isinstance(bottleneck, BottleneckEmbedding):
        raise DeltakdError("align_bottleneck: the student has no bottleneck embedding (add_embedding_bottleneck)")
    if isinstance(pretrained, Tensor):
        weight = pretrained
    else:
        emb = input_embeddings(pretrained)
        weight = emb.full_weight() if isinstance(emb, BottleneckEmbedding) else emb.weight
    w = weight.detach().to(torch.float64)  # (V, H)
    v, h = bottleneck.num_embeddings, bottleneck.embedding_dim
    if tuple(w.shape) != (v, h):
        raise DeltakdError(f"align_bottleneck: pretrained embedding is {tuple(w.shape)}, the student's is ({v}, {h})")
    has_bias = bottleneck.proj.bias is not None
    mu = w.mean(dim=0) if has_bias else torch.zeros(h, dtype=w.dtype, device=w.device)  # (H,)
    x = w - mu  # (V, H)
    # right singular vectors from the (H, H) Gram matrix: same subspace as the SVD, much faster
    # than an SVD of the tall (V, H) matrix; U_k S_k = x V_k
    _, vecs = torch.linalg.eigh(x.transpose(0, 1) @ x)  # ascending eigenvalues
    d = bottleneck.bottleneck_dim
    k = min(d, h)
    top = vecs[:, -k:].flip(1) if k else vecs[:, :0]  # (H, k), largest first
    small = torch.zeros(v, d, dtype=w.dtype, device=w.device)
    small[:, :k] = x @ top  # (V, k) = U_k S_k
    proj = torch.zeros(h, d, dtype=w.dtype, device=w.device)
    proj[:, :k] = top  # (H, k)
    target = bottleneck.small.weight
    bottleneck.small.weight.copy_(small.to(device=target.device, dtype=target.dtype))
    bottleneck.proj.weight.copy_(proj.to(device=target.device, dtype=target.dtype))
    if has_bias:
        bottleneck.proj.bias.copy_(mu.to(device=target.device, dtype=target.dtype))
    approx = small @ proj.transpose(0, 1) + mu  # (V, H)
    return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp_min(1e-30))


def bottleneck_student(pretrained: PreTrainedModel, dim: int, align: bool = True, bias: bool = True) -> PreTrainedModel:
    """A copy of ``pretrained`` whose token embedding is a d-dim bottleneck, SVD-aligned to the
    pretrained embedding when ``align`` (else random). Everything else is copied."""
    student = copy.deepcopy(pretrained)
    add_embedding_bottleneck(student, dim, bias=bias)
    if align:
        align_bottleneck(student, pretrained)
    return student


@torch.no_grad()
def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """Multiply a bottleneck out into a plain ``nn.Embedding(V, H)`` (weight ``proj(small.weight)``),
    in place; a model without bottleneck is returned unchanged. Same outputs, plain architecture."""
    emb = input_embeddings(model)
    if isinstance(emb, BottleneckEmbedding):
        full = emb.full_weight()  # (V, H)
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        plain.to(device=full.device, dtype=full.dtype)
        plain.weight.copy_(full)
        model.set_input_embeddings(plain)
        sync_spec(model)
    return model

