"""The model's input schema: every array a batch, a record or a sampler call hands the model.

One :class:`InputSpec` (``DiffusionModel.input_spec()``) describes them all, so the train step's
batch keys and shapes, the sampler's canonical condition tree, the exported step's signature, init's
dummy inputs and the evaluation code's "latents and conditions of this batch" are all derived from
it. Adding a condition path (e.g. precomputed UMT5 features instead of byte tokens) changes
:func:`condition_fields` and nothing else.

Fields (per example; a batch adds a leading ``B``):

* ``{stream}_latents`` float32 ``[*latent_shape]`` -- role ``latents`` of stream ``{stream}`` (every
  stream, condition streams included);
* a condition ``c`` is either *tokens* the model encodes itself (``text_tokens`` int32 ``[L]``, role
  ``tokens``, when the byte text encoder is on) or precomputed *features* ``c`` float32 ``[L, C]``
  (role ``features``) with an optional padding mask ``c_mask`` bool ``[L]`` (role ``mask``, all True
  when absent);
* a *derived* condition (``model.conditions.<c>.derived``, e.g. ``first_frame``) has no field: the
  model computes it from its own input tokens (:mod:`mmdit.model.derived_conditions`);
* ``speaking_frames`` int32 ``[F]`` (role ``speaking``; ``F`` = latent frames of the time-reference
  stream), when a condition has ``silence_embedding``: 1 where the subject speaks, 0 in silence mode
  (a listening phase), where the learned silence embedding replaces that condition's tokens. Optional
  (all speaking when absent) unless ``silence_labels``; a batch holding the per-clip ``speaking`` int32
  ``[]`` instead is broadcast over the frames (:meth:`InputSpec.conditions_of`);
* ``face_box`` float32 ``[4]`` (role ``region``): the face's normalised ``x0, y0, x1, y1`` in the frame,
  when a condition is ``face_local`` (grid streams attend it only from tokens whose patch centre lies in
  the box). Required in records (the ingest writes it); a sampler call without it uses the whole frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

LATENT_SUFFIX = "_latents"
MASK_SUFFIX = "_mask"
TOKENS_SUFFIX = "_tokens"
SPEAKING_FRAMES = "speaking_frames"  # int32 [F]: 1 speaking, 0 silence mode
SPEAKING_CLIP = "speaking"  # int32 []: one label per clip (records), broadcast to SPEAKING_FRAMES
FACE_BOX = "face_box"  # float32 [4]: normalised x0, y0, x1, y1
FULL_FRAME_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class InputField:
    """One input array. ``name``: batch / record key; ``source``: the stream or condition it belongs
    to; ``role``: ``latents`` | ``tokens`` | ``features`` | ``mask`` | ``speaking`` | ``region``; ``shape``: per
    example; ``optional``: may be left out (then :meth:`default`)."""

    name: str
    source: str
    role: str
    shape: tuple[int, ...]
    dtype: Any
    optional: bool = False

    def struct(self, batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *self.shape), self.dtype)

    def default(self, batch: int) -> jax.Array:
        """What an absent field is: a mask of all True, speaking everywhere, the whole frame as the face
        box; anything else zeros."""
        if self.role == "region":
            return jnp.broadcast_to(jnp.asarray(FULL_FRAME_BOX, self.dtype), (batch, *self.shape))
        fill = jnp.ones if self.role in ("mask", "speaking") else jnp.zeros
        return fill((batch, *self.shape), self.dtype)


def condition_fields(condition, encodes_tokens: bool) -> tuple[InputField, ...]:
    """The raw input fields of one condition (``mmdit.model.spec.ConditionSpec``): tokens when the
    model holds an encoder for it (``encodes_tokens``), else features plus an optional mask. The only
    place that rule is written."""
    c = condition
    if encodes_tokens:
        return (InputField(c.name + TOKENS_SUFFIX, c.name, "tokens", (c.length,), jnp.int32),)
    return (
        InputField(c.name, c.name, "features", (c.length, c.dim), jnp.float32),
        InputField(c.name + MASK_SUFFIX, c.name, "mask", (c.length,), jnp.bool_, optional=True),
    )


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Every input field of a model, streams first (in stream order), then conditions."""

    fields: tuple[InputField, ...]

    def by_role(self, *roles: str) -> tuple[InputField, ...]:
        return tuple(f for f in self.fields if f.role in roles)

    @property
    def latent_fields(self) -> tuple[InputField, ...]:
        return self.by_role("latents")

    @property
    def condition_fields(self) -> tuple[InputField, ...]:
        """The raw-condition fields (tokens, features, masks, speaking flags, face box)."""
        return self.by_role("tokens", "features", "mask", "speaking", "region")

    @property
    def record_fields(self) -> tuple[InputField, ...]:
        """What a training record must hold (optional masks are not written by the writers)."""
        return tuple(f for f in self.fields if not f.optional)

    def record_keys(self) -> list[str]:
        return [f.name for f in self.record_fields]

    def batch_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes of one training batch ``{key: [B, ...]}``."""
        return {f.name: f.struct(batch) for f in self.record_fields}

    # -- conditions --------------------------------------------------------------------------

    def zero_conditions(self, batch: int) -> dict:
        """Zero inputs (masks all True) of every condition field: init's and export's examples."""
        return {f.name: f.default(batch) for f in self.condition_fields}

    def conditions_of(self, batch: Mapping[str, Any]) -> dict:
        """The raw conditions held in a batch / record dict (other keys ignored); a per-clip ``speaking``
        ``[B]`` stands in for a missing ``speaking_frames`` ``[B, F]``."""
        out = {f.name: batch[f.name] for f in self.condition_fields if f.name in batch}
        for f in self.by_role("speaking"):
            if f.name not in out and SPEAKING_CLIP in batch:
                clip = jnp.asarray(batch[SPEAKING_CLIP], f.dtype)
                out[f.name] = jnp.broadcast_to(clip.reshape(clip.shape[:1] + (1,) * len(f.shape)), clip.shape[:1] + f.shape)
        return out

    def canonical_conditions(self, raw: Mapping[str, Any], batch: int) -> dict:
        """``raw`` as the fixed tree a step function takes (every field present, masks defaulted,
        dtypes cast). Raises ValueError naming a missing or mis-shaped input and what it should be."""
        out = {}
        for f in self.condition_fields:
            want = (batch, *f.shape)
            if f.name not in raw or raw[f.name] is None:
                if f.optional or f.role in ("speaking", "region"):  # sampling: speaking, whole frame
                    out[f.name] = f.default(batch)
                    continue
                how = (
                    f"(ByteTokenizer().encode(text, {f.shape[0]})) for the byte text encoder"
                    if f.role == "tokens"
                    else f"(model.conditions.{f.source})"
                )
                raise ValueError(
                    f"raw_conds needs {f.name!r} {np.dtype(f.dtype).name} [B, {', '.join(map(str, f.shape))}] "
                    f"{how}; got {sorted(raw)}"
                )
            out[f.name] = jnp.asarray(raw[f.name], f.dtype)
            if tuple(out[f.name].shape) != want:
                raise ValueError(
                    f"raw_conds[{f.name!r}] has shape {tuple(out[f.name].shape)}, expected {want} "
                    f"(batch {batch}; model.conditions.{f.source})"
                )
        return out

    # -- streams -----------------------------------------------------------------------------

    def latents_of(self, batch: Mapping[str, Any]) -> dict:
        """``{stream: latents}`` of the streams a batch / record dict holds."""
        return {f.source: batch[f.name] for f in self.latent_fields if f.name in batch}


def input_spec(model_spec, encoded_conditions: tuple[str, ...] = ()) -> InputSpec:
    """The schema of a ``ModelSpec`` whose conditions named in ``encoded_conditions`` are encoded by
    the model itself from tokens."""
    fields = [
        InputField(a.name + LATENT_SUFFIX, a.name, "latents", tuple(a.geometry.latent_shape), jnp.float32)
        for a in model_spec.streams
    ]
    for c in model_spec.conditions:
        if c.derived is None:  # a derived condition is computed from the tokens (mmdit.model.derived_conditions)
            fields += condition_fields(c, c.name in encoded_conditions)
    silence = [c for c in model_spec.conditions if c.silence_embedding]
    if silence:
        labels = any(c.silence_labels for c in silence)
        fields.append(
            InputField(
                SPEAKING_FRAMES, SPEAKING_FRAMES, "speaking", (model_spec.reference_frames,), jnp.int32, optional=not labels
            )
        )
    if any(c.face_local for c in model_spec.conditions):
        fields.append(InputField(FACE_BOX, FACE_BOX, "region", (4,), jnp.float32))
    return InputSpec(tuple(fields))
