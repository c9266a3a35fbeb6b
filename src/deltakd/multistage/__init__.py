"""Multilingual sentence-embedding distillation in stages (the ``multistage`` family).

Reimers & Gurevych 2020 (multilingual knowledge distillation, MSE baseline) and Ding et al. 2022
(multi-stage distillation: bottleneck, parameter recurrence, multilingual contrastive learning).

- ``data``: parallel pairs, cross-lingual STS, held-out split, pair collator;
- ``structure``: the bottleneck embedding module, the transformer-layer list, the structure spec;
- ``bottleneck``: factorised token embedding, SVD alignment, multiplying it out;
- ``recurrence``: layer patterns, shared layers (apply, build a student, unroll), kept-layer search;
- ``saving``: save / load / export of students (portable and compact forms), SentenceTransformer
  wrapping;
- ``losses``: pure tensor losses (Reimers MSE, InfoNCE / MCL, in-batch CE and BCE);
- ``evaluate``: MSE x100, translation retrieval, STS Spearman, encode speed;
- ``recipe``: the family's recipe model (``family: multistage``), stage structure and losses;
- ``teacher``: sentence-transformers teacher, English embeddings cached on disk;
- ``trainer``: the HF Trainer subclass (loss terms, held-out evaluation);
- ``processes``: torchrun: main-process writes, teacher cache built first by the main process,
  in-batch negatives gathered from every process;
- ``run``: one stage, the ``init_from`` chain and ``deltakd pipeline`` (skip / resume / re-test).
"""
