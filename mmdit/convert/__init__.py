"""Pretrained checkpoints (Hugging Face safetensors folders) -> mmdit params: ``mmdit convert``.

* :mod:`mmdit.convert.source` -- :class:`TensorSource` (one tensor at a time from a model folder),
  :class:`DictSource` (tests), :class:`ConvertError`.
* :mod:`mmdit.convert.registry` -- the family table (``--family`` name -> module, imported lazily)
  and auto-detection from ``config.json``.
* :mod:`mmdit.convert.run` -- :func:`convert_dir`: check, stream, write atomically with a manifest.
* one module per family (``wan_dit``, ``wan_vae``, ``mmaudio_vae``, ``mmaudio_vocoder``, ``umt5``,
  ``wav2vec2``, ``clip_vision``), each defining ``NAME``, ``DESCRIPTION``, ``matches``, ``check``,
  ``target``, ``convert``, ``build`` (and optionally ``IGNORED(hf_config)``: fnmatch patterns of
  source tensors it deliberately drops -- any other tensor left unread fails the conversion).

The output is read back with :func:`mmdit.util.converted.load` (which does not import this package).
"""
