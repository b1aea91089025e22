"""The client dimension: the building blocks of the lockstep engines, which train every sampled client at once.

Every tensor carries a client dimension N (embeddings (N, E), classifiers (N, K, D), batches (N, B, C, H, W),
...), and each local step is a handful of batched ops (:mod:`hyperfl_fast.ops`: measured Triton or torch on
CUDA, vectorised PyTorch on the CPU) for all clients at once.  Per-client optimizer semantics (each client's own
clip coefficient, momentum and weight decay) are kept exactly, so a lockstep engine computes what
:mod:`hyperfl_fast.reference` computes, up to float rounding (``tests/test_engine_equivalence.py`` checks it).

- :mod:`.data`: every client's data stacked on the device, and a round's schedule (batches in lockstep);
- :mod:`.evaluation`: logits, per-client losses and accuracies, and the round's figures;
- :mod:`.optim`: ``torch.optim.SGD`` on stacked per-client tensors;
- :mod:`.hypernet`: every sampled client's HyperFL hypernetwork, heads in factored form;
- :mod:`.graphs`: ``--cuda-graphs``, a step captured once and replayed.

Schedules.  Each client draws its epoch exactly as the reference does (same generator, same shuffle, same
augmentation draws, see :mod:`hyperfl_fast.federation`).  Clients with fewer batches than others are
**masked**: a step where a client has no batch leaves all its state unchanged, and a partial last batch
averages the loss over its valid rows only.
"""
