"""Attention below the model: mask rules and the registry of attention implementations.

* :mod:`~mmdit.attention.masks` -- token metadata, mask rules as predicates, dense masks and block
  maps (built with ``mmdit_kernels``' helpers);
* :mod:`~mmdit.attention.registry` -- ``model.attention.impl`` (``auto`` | ``xla`` | ``cudnn`` |
  ``pallas`` | ``pallas_gpu`` | ``pallas_tpu`` | ``splash``) -> a function ``(q, k, v, mask, opts) -> out``,
  plus the blockwise ``(out, lse)`` / backward pairs ring attention runs per block;
* :mod:`~mmdit.attention.pallas` -- registers the ``mmdit_kernels`` Pallas kernels (imported lazily
  by the registry when a ``pallas*`` impl or ``splash`` is chosen).

Nothing here imports :mod:`mmdit.model` or :mod:`mmdit.parallel`: both build on this package.
"""
