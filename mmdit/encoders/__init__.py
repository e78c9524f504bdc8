"""Frozen pretrained condition encoders in Flax, converted from transformers checkpoints.

* :mod:`mmdit.encoders.umt5` -- UMT5 encoder + tokenizer (Wan's text encoder);
* :mod:`mmdit.encoders.wav2vec2` -- wav2vec 2.0 (50 Hz audio features of a chosen layer) + resampling;
* :mod:`mmdit.encoders.clip_vision` -- CLIP vision tower (Wan2.1-I2V's image encoder) + preprocessing;
* :mod:`mmdit.encoders.layers` -- the shared blocks (norms, attention, activations, layer truncation);
* :mod:`mmdit.encoders.registry` -- ``make_encoder(cfg)`` from a converted checkpoint, and
  ``ConditionEncoders`` (a config's ``encoders`` section, used by ingest and sampling).

Same layer as :mod:`mmdit.codecs`: weights come from :func:`mmdit.util.converted.load`, never from
:mod:`mmdit.convert`.
"""
