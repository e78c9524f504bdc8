"""Training examples on disk: a versioned record format, an atomic ArrayRecord shard writer and a
checked reader.

**Example.** A flat ``dict[str, value]``; a value is a numeric ``np.ndarray`` (bool/int/uint/float/
complex or an ``ml_dtypes`` type such as bfloat16), ``str``, ``int``, ``float`` or ``bool``, e.g.
``video_latents [F, h, w, C]`` float16, ``audio_latents [L, C]``, ``text``, ``text_tokens [L]
int32``, ``identity``, optional ``ref_audio_latents``. NumPy scalars come back as Python scalars;
arrays as read-only views of the record bytes (copy before editing in place).

**Record format v1** (``RECORD_FORMAT_VERSION``), one ArrayRecord record per example, no pickle::

    msgpack map {"v": 1, "f": {key: value}}
    value = str | int (int64) | float (float64) | bool
          | {"nd": dtype name (np.dtype.name, e.g. "float16", "bfloat16"),
             "shape": [d0, d1, ...], "data": raw little-endian C-order bytes}

**Directory layout** written by :class:`ShardWriter`::

    out_dir/manifest.json                          the dataset: only what it lists exists
    out_dir/{prefix}-00000-of-00003.array_record   shards (ArrayRecord, group_size:1, zstd)
    out_dir/{prefix}-00003.array_record.tmp        leftovers of an unfinished writer (ignored)

``manifest.json``: ``format`` ("mmdit.records"), ``format_version``, ``record_format``,
``num_examples``, ``shards`` ([{file, num_examples, num_bytes, sha256}]), ``schema`` ({key: {kind:
array|str|int|float|bool, dtype, shape (None = varies), optional}}), ``skipped`` ({reason: count}),
``skipped_sources`` ([{source, reason, detail}]), ``producer``, ``metadata``, ``created``.

**Atomicity.** Shards are written as ``*.tmp`` and fsynced; :meth:`ShardWriter.close` commits:
rename tmp → final names that no shard of the old dataset uses (``{prefix}-r1-00000-of-...`` when
the plain names are taken), fsync the directory, write the manifest via tmp + fsync +
``os.replace`` (the commit point), then delete the old dataset's shards that the new one does not
list. A writer killed at any point leaves either the previous dataset (if any) or the new one
complete and readable; its leftovers (``.tmp`` shards, final-named shards no manifest lists) are
never opened by the reader and are removed by the next writer of the directory. One writer per
directory (``mmdit-data synth`` and ingest hold :mod:`mmdit.util.lock`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. so np.dtype("bfloat16") resolves)
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from mmdit.util.files import file_sha256, fsync_path, write_json_atomic

RECORD_FORMAT_VERSION = 1
MANIFEST_FORMAT = "mmdit.records"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
TMP_SUFFIX = ".tmp"
WRITER_OPTIONS = "group_size:1"  # grain needs group_size 1 for fast random access
_MAX_LISTED_SKIPS = 10_000

# Reasons for counted skips (SkipExample.reason); free-form reasons are allowed too.
SKIP_NON_FINITE = "non_finite"
SKIP_SILENT = "silent_audio"
SKIP_LENGTH = "length_mismatch"
SKIP_SCHEMA = "schema_mismatch"
SKIP_CORRUPT = "corrupt_media"
SKIP_NO_AUDIO = "no_audio_stream"
SKIP_TOO_SHORT = "too_short"

Schema = dict[str, dict[str, Any]]


class SkipExample(Exception):
    """An input that must not be trained on; :meth:`ShardWriter.skip` counts it by ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _normalise(key: str, value: Any) -> Any:
    """Returns ``value`` as a Python scalar, str or a little-endian C-order ndarray."""
    for types, cast in (((bool, np.bool_), bool), ((int, np.integer), int), ((float, np.floating), float), ((str,), str)):
        if isinstance(value, types):
            return cast(value)
    if isinstance(value, (bytes, dict, list, tuple)) or not hasattr(value, "__array__"):
        raise TypeError(
            f"example key {key!r}: unsupported value type {type(value).__name__}; use an np.ndarray, str, int, float or bool"
        )
    arr = np.asarray(value)
    dt = arr.dtype
    if not (dt.kind in "biufc" or (dt.kind == "V" and np.dtype(dt.name) == dt)):
        raise TypeError(
            f"example key {key!r}: dtype {dt} cannot be stored (object, string and "
            "structured arrays are not allowed); store text as a str value"
        )
    if dt.byteorder == ">":
        arr = arr.astype(dt.newbyteorder("<"))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray: ndim>=1)


def field_spec(value: Any) -> dict[str, Any]:
    """The schema entry of one (normalised) value: ``{"kind", "dtype"?, "shape"?}``."""
    if isinstance(value, np.ndarray):
        return {"kind": "array", "dtype": value.dtype.name, "shape": list(value.shape)}
    return {"kind": {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]}


def encode_example(example: Mapping[str, Any]) -> bytes:
    """Serialises one example to record-format-v1 bytes (see module docstring)."""
    fields = {}
    for key, value in example.items():
        if not isinstance(key, str):
            raise TypeError(f"example keys must be str, got {key!r}")
        value = _normalise(key, value)
        if isinstance(value, np.ndarray):
            value = {"nd": value.dtype.name, "shape": list(value.shape), "data": value.tobytes()}
        fields[key] = value
    return msgpack.packb({"v": RECORD_FORMAT_VERSION, "f": fields}, use_bin_type=True)


def decode_example(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_example`; raises ``ValueError`` on bytes it cannot parse."""
    try:
        rec = msgpack.unpackb(data, raw=False)
        if not isinstance(rec, dict) or rec.get("v") != RECORD_FORMAT_VERSION:
            raise ValueError(
                f"record format {rec.get('v') if isinstance(rec, dict) else '?'}, this reader understands {RECORD_FORMAT_VERSION}"
            )
        out = {}
        for key, value in rec["f"].items():
            if isinstance(value, dict):
                arr = np.frombuffer(value["data"], np.dtype(value["nd"]))
                value = arr.reshape(tuple(value["shape"]))
            out[key] = value
        return out
    except (ValueError, KeyError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise ValueError(f"undecodable record: {type(e).__name__}: {e}") from e


def merge_spec(key: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Combines two specs of one key; differing dims become ``None``. Kind/dtype/rank must agree."""
    if old["kind"] != new["kind"] or old.get("dtype") != new.get("dtype"):
        raise ValueError(
            f"example key {key!r} is {new.get('dtype', new['kind'])} but earlier "
            f"examples had {old.get('dtype', old['kind'])}: cast every example the same"
        )
    if old["kind"] != "array":
        return old
    if len(old["shape"]) != len(new["shape"]):
        raise ValueError(
            f"example key {key!r} has shape {new['shape']} but earlier examples had "
            f"rank {len(old['shape'])} ({old['shape']}); keep the rank fixed"
        )
    return {**old, "shape": [a if a == b else None for a, b in zip(old["shape"], new["shape"])]}


def schema_mismatches(actual: Schema, expected: Schema, *, allow_extra: bool = True) -> list[str]:
    """Human-readable differences of ``actual`` from ``expected`` (empty list = compatible).

    ``expected`` entries may omit ``dtype``/``shape`` and use ``None`` dims as wildcards; a key
    with ``"optional": True`` may be absent.
    """
    problems = []
    for key, exp in expected.items():
        act = actual.get(key)
        if act is None or act["kind"] != exp["kind"]:
            if act is not None or not exp.get("optional", False):
                problems.append(f"{key!r} is a {act['kind']}, expected {exp['kind']}" if act else f"missing key {key!r}")
            continue
        if exp.get("dtype") is not None and act.get("dtype") != exp["dtype"]:
            problems.append(f"{key!r} has dtype {act.get('dtype')}, expected {exp['dtype']}")
        if exp.get("shape") is not None:
            a, e = act.get("shape") or [], exp["shape"]
            if len(a) != len(e) or any(x is not None and x != y for x, y in zip(e, a)):
                problems.append(f"{key!r} has shape {a}, expected {e} (None = any)")
    if not allow_extra:
        problems += [f"unexpected key {k!r}" for k in actual if k not in expected]
    return problems


def example_schema(example: Mapping[str, Any]) -> Schema:
    """The schema of one example (every key required, every dim fixed)."""
    return {k: field_spec(_normalise(k, v)) for k, v in example.items()}


@dataclasses.dataclass(frozen=True)
class ExampleSchema:
    """What :func:`validate_example` accepts.

    Attributes:
      fields: expected (partial) schema, e.g. ``{"video_latents": {"kind": "array", "dtype":
        "float16", "shape": [None, None, None, 16]}}``.
      max_av_mismatch_s: largest |video duration − audio duration| in seconds (AAC priming and
        padding alone make them differ by up to ~1 AAC frame, 1024 samples).
      min_audio_rms: waveforms with RMS below this (linear full scale; 1e-3 ≈ −60 dBFS) are silent.
    """

    fields: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    max_av_mismatch_s: float = 0.1
    min_audio_rms: float = 1e-3


def validate_example(
    example: Mapping[str, Any],
    schema: ExampleSchema,
    *,
    video_seconds: float | None = None,
    audio_seconds: float | None = None,
    waveform: np.ndarray | None = None,
) -> None:
    """Raises :class:`SkipExample` if ``example`` must not be written; returns None otherwise.

    ``example`` may be empty when only the source media is checked. ``video_seconds`` /
    ``audio_seconds``: durations of the *source* streams (frames / fps, samples / sample_rate),
    compared when both are given. ``waveform``: source audio (float, full scale ±1) for the
    silence and NaN checks.
    """
    problems = schema_mismatches(example_schema(example), dict(schema.fields))
    if problems:
        raise SkipExample(SKIP_SCHEMA, "; ".join(problems))
    for key, value in list(example.items()) + [("waveform", waveform)]:
        value = np.asarray(value) if isinstance(value, float) else value
        if isinstance(value, np.ndarray) and value.dtype.kind in "fcV" and value.size:
            if not np.isfinite(value if value.dtype.kind in "fc" else value.astype(np.float32)).all():
                raise SkipExample(SKIP_NON_FINITE, f"{key!r} holds NaN or Inf")
    if video_seconds is not None and audio_seconds is not None:
        if abs(video_seconds - audio_seconds) > schema.max_av_mismatch_s:
            raise SkipExample(
                SKIP_LENGTH, f"video {video_seconds:.3f}s vs audio {audio_seconds:.3f}s (> {schema.max_av_mismatch_s}s apart)"
            )
    if waveform is not None:
        w = np.asarray(waveform, np.float64)
        rms = float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
        if rms < schema.min_audio_rms:
            raise SkipExample(SKIP_SILENT, f"audio RMS {rms:.2e} < {schema.min_audio_rms:.0e}")


class ShardWriter:
    """Writes examples into ArrayRecord shards of ``examples_per_shard`` plus a manifest.

    A context manager: a clean exit commits (:meth:`close`), an exception discards the tmp shards
    (:meth:`abort`) and keeps any previous dataset. ``overwrite`` replaces a dataset already in
    ``out_dir`` (at commit time); ``producer`` (the command that makes the dataset) is quoted by
    reader errors as the fix; ``metadata`` (JSON) goes into the manifest (codec rates, config).
    """

    def __init__(
        self,
        out_dir: str,
        prefix: str = "data",
        examples_per_shard: int = 256,
        *,
        overwrite: bool = False,
        producer: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        if examples_per_shard < 1:
            raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
        if not prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir, self.prefix, self.examples_per_shard = out_dir, prefix, examples_per_shard
        self.producer = producer or "the command that wrote this dataset"
        self.metadata = dict(metadata or {})
        os.makedirs(out_dir, exist_ok=True)
        self._manifest_path = os.path.join(out_dir, MANIFEST_NAME)
        if os.path.exists(self._manifest_path) and not overwrite:
            raise ValueError(
                f"{out_dir} already holds a dataset ({MANIFEST_NAME}); pass "
                "overwrite=True to replace it or write to an empty directory"
            )
        self._remove_leftovers()
        self._schema: Schema = {}
        self._key_counts: dict[str, int] = {}
        self._shards: list[dict[str, Any]] = []  # finished tmp shards
        self._writer: ArrayRecordWriter | None = None
        self._tmp_path, self._in_shard, self.num_written = "", 0, 0
        self.skipped: dict[str, int] = {}
        self._skip_list: list[dict[str, str]] = []
        self._closed = False

    def _remove_leftovers(self) -> None:
        """Deletes the ``.tmp`` shards of a killed writer with this prefix (the caller is the
        directory's one writer), so they do not pile up."""
        for name in os.listdir(self.out_dir):
            if name.startswith(f"{self.prefix}-") and name.endswith(SHARD_SUFFIX + TMP_SUFFIX):
                os.remove(os.path.join(self.out_dir, name))

    # -- adding examples
    def write(self, example: Mapping[str, Any]) -> None:
        """Appends one example (see the module docstring for allowed values)."""
        self._check_open()
        schema = dict(self._schema)  # committed only once the example is written
        for key, s in example_schema(example).items():
            schema[key] = merge_spec(key, schema[key], s) if key in schema else s
        data = encode_example(example)
        if self._writer is None:
            self._tmp_path = os.path.join(self.out_dir, f"{self.prefix}-{len(self._shards):05d}{SHARD_SUFFIX}{TMP_SUFFIX}")
            self._writer = ArrayRecordWriter(self._tmp_path, WRITER_OPTIONS)
        self._writer.write(data)
        self._schema = schema
        for key in example:
            self._key_counts[key] = self._key_counts.get(key, 0) + 1
        self._in_shard += 1
        self.num_written += 1
        if self._in_shard == self.examples_per_shard:
            self._finish_shard()

    def skip(self, reason: str | SkipExample, *, source: str = "", detail: str = "") -> None:
        """Counts a skipped input under ``reason`` (a :class:`SkipExample` or a reason string)."""
        self._check_open()
        if isinstance(reason, SkipExample):
            reason, detail = reason.reason, detail or reason.detail
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self._skip_list) < _MAX_LISTED_SKIPS:
            self._skip_list.append({"source": source, "reason": reason, "detail": detail})

    # -- committing
    def close(self) -> dict[str, Any]:
        """Commits the dataset (see module docstring) and returns the manifest."""
        self._check_open()
        if self._writer is not None:
            self._finish_shard()
        self._closed = True
        old = None
        if os.path.exists(self._manifest_path):
            try:  # the old dataset stays readable until the new manifest replaces it
                old = json.loads(pathlib.Path(self._manifest_path).read_text())
            except (OSError, ValueError):
                pass
        old_files = {s.get("file") for s in (old or {}).get("shards", [])}
        n, tag, k = len(self._shards), "", 0

        def names(tag: str) -> list[str]:
            return [f"{self.prefix}{tag}-{i:05d}-of-{n:05d}{SHARD_SUFFIX}" for i in range(n)]

        while old_files & set(names(tag)):
            k += 1
            tag = f"-r{k}"
        for shard, name in zip(self._shards, names(tag)):
            shard["file"] = name
            os.replace(shard.pop("tmp"), os.path.join(self.out_dir, name))
        fsync_path(self.out_dir)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "record_format": RECORD_FORMAT_VERSION,
            "num_examples": self.num_written,
            "shards": self._shards,
            "producer": self.producer,
            "metadata": self.metadata,
            "schema": {k: {**s, "optional": self._key_counts[k] < self.num_written} for k, s in sorted(self._schema.items())},
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_sources": self._skip_list,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        write_json_atomic(self._manifest_path, manifest)  # the commit point
        kept = {s["file"] for s in self._shards}
        for name in os.listdir(self.out_dir):  # the old dataset's shards and a killed writer's final-named ones
            if name.startswith(f"{self.prefix}-") and name.endswith(SHARD_SUFFIX) and name not in kept:
                os.remove(os.path.join(self.out_dir, name))
        for s in (old or {}).get("shards", []):
            path = os.path.join(self.out_dir, s["file"])
            if s["file"] not in kept and os.path.exists(path):
                os.remove(path)
        return manifest

    def abort(self) -> None:
        """Discards this writer's unfinished tmp shards; any previous dataset stays as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shards.append({"tmp": self._tmp_path})
        for s in self._shards:
            if "tmp" in s and os.path.exists(s["tmp"]):
                os.remove(s["tmp"])
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:
            self.close() if exc_type is None else self.abort()

    def _finish_shard(self) -> None:
        if not self._writer.ok():
            self.abort()
            raise OSError(f"ArrayRecord writer failed on {self._tmp_path} (disk full?); nothing was committed to {self.out_dir}")
        writer, self._writer = self._writer, None
        writer.close()
        fsync_path(self._tmp_path)
        self._shards.append(
            {
                "tmp": self._tmp_path,
                "num_examples": self._in_shard,
                "num_bytes": os.path.getsize(self._tmp_path),
                "sha256": file_sha256(self._tmp_path),
            }
        )
        self._in_shard = 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is already closed")


def _rerun_hint(data_dir: str, producer: str | None = None) -> str:
    who = producer or "the command that wrote it (e.g. `mmdit-data synth` or mmdit.data.ingest)"
    return f"re-run {who} to rebuild {data_dir}"


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Loads and checks ``data_dir/manifest.json``; ``ValueError`` naming the problem otherwise."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        leftovers = [f for f in os.listdir(data_dir) if f.endswith(TMP_SUFFIX)] if os.path.isdir(data_dir) else []
        why = (
            f"the writer did not finish ({len(leftovers)} *.tmp leftovers)"
            if leftovers
            else "not a records directory or the writer never committed"
        )
        raise ValueError(f"{path} does not exist: {why}; {_rerun_hint(data_dir)}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); {_rerun_hint(data_dir)}") from e
    got = tuple(manifest.get(k) for k in ("format", "format_version", "record_format"))
    if got != (MANIFEST_FORMAT, MANIFEST_VERSION, RECORD_FORMAT_VERSION):
        raise ValueError(
            f"{path}: format {got[0]} v{got[1]} / records v{got[2]}; this mmdit reads "
            f"{MANIFEST_FORMAT} v{MANIFEST_VERSION} / records v"
            f"{RECORD_FORMAT_VERSION}: {_rerun_hint(data_dir, manifest.get('producer'))}"
            " with this version"
        )
    return manifest


# array_record's FileInstruction protocol: the counts come from the manifest, no re-opening.
_FileInstruction = collections.namedtuple("_FileInstruction", "filename skip take examples_in_shard")


class RecordDataSource:
    """A grain ``RandomAccessDataSource`` of decoded examples over the shards of a manifest.

    ``len(ds)`` examples; ``ds[i]`` → example dict. Picklable (grain workers re-open files
    lazily). ``repr`` depends on the dataset content (shard names, counts, hashes), not on its
    path, so grain iterator checkpoints stay valid when the directory moves.
    """

    def __init__(self, data_dir: str, manifest: dict[str, Any]):
        from grain.sources import ArrayRecordDataSource  # deferred: grain import is slow

        self.data_dir, self.manifest = data_dir, manifest
        self.schema: Schema = manifest["schema"]
        self._hint = _rerun_hint(data_dir, manifest.get("producer"))
        self._files = [os.path.join(data_dir, s["file"]) for s in manifest["shards"]]
        self._ends = np.cumsum([s["num_examples"] for s in manifest["shards"]]).tolist()
        ident = json.dumps([[s["file"], s["num_examples"], s.get("sha256")] for s in manifest["shards"]])
        self._id = hashlib.sha1(ident.encode()).hexdigest()[:16]
        self._source = (
            ArrayRecordDataSource(
                [_FileInstruction(f, 0, s["num_examples"], s["num_examples"]) for f, s in zip(self._files, manifest["shards"])]
            )
            if self._files
            else None
        )

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"RecordDataSource(id={self._id}, num_examples={len(self)})"

    def shard_of(self, index: int) -> tuple[str, int]:
        """(shard path, position in that shard) of global example ``index``."""
        s = int(np.searchsorted(self._ends, index, side="right"))
        return self._files[s], index - (self._ends[s - 1] if s else 0)

    def _decode(self, index: int, data: bytes) -> dict[str, Any]:
        path, pos = self.shard_of(index)
        try:
            ex = decode_example(data)
        except ValueError as e:
            raise ValueError(f"{path}: record {pos} is {e}; {self._hint}") from e
        problems = schema_mismatches(example_schema(ex), self.schema, allow_extra=False)
        if problems:
            raise ValueError(
                f"{path}: record {pos} does not match the schema in {MANIFEST_NAME} "
                f"({'; '.join(problems)}); the shard and manifest come from different "
                f"runs: {self._hint}"
            )
        return ex

    def _read(self, indices: list[int]) -> list[bytes]:
        if not 0 <= min(indices) <= max(indices) < len(self):
            raise IndexError(f"index out of range for {len(self)} examples: {indices}")
        try:
            return list(self._source.__getitems__(indices))
        except RuntimeError as e:  # riegeli: hash mismatch, truncated chunk, ...
            files = ", ".join(sorted({self.shard_of(i)[0] for i in indices}))
            raise ValueError(f"{files}: corrupt ArrayRecord data ({e}); {self._hint}") from e

    def __getitem__(self, index) -> dict[str, Any]:
        index = index.__index__()
        return self._decode(index, self._read([index])[0])

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        indices = [i.__index__() for i in indices]
        return [self._decode(i, d) for i, d in zip(indices, self._read(indices))]


def open_dataset(data_dir: str, *, expected_schema: Schema | None = None, verify_checksums: bool = False) -> RecordDataSource:
    """Opens the dataset in ``data_dir`` (only the shards its manifest lists; ``*.tmp`` ignored).

    Checks, each raising ``ValueError`` that names the file and the fix: manifest present and of a
    known version; every listed shard exists, has the recorded size and record count (a truncated
    shard fails here), and, with ``verify_checksums``, the recorded sha256 (reads every byte);
    the dataset schema satisfies ``expected_schema`` (see :func:`schema_mismatches`).
    """
    manifest = read_manifest(data_dir)
    hint = _rerun_hint(data_dir, manifest.get("producer"))
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["file"])
        if not os.path.exists(path):
            raise ValueError(f"{path} is listed in {MANIFEST_NAME} but missing; {hint}")
        size = os.path.getsize(path)
        if size != shard["num_bytes"]:
            raise ValueError(
                f"{path} is {size} bytes but {MANIFEST_NAME} says {shard['num_bytes']}: the shard is truncated or corrupt; {hint}"
            )
        try:
            reader = ArrayRecordReader(path)
            count, _ = reader.num_records(), reader.close()
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a readable ArrayRecord file ({e}); {hint}") from e
        if count != shard["num_examples"]:
            raise ValueError(
                f"{path} holds {count} records but {MANIFEST_NAME} says {shard['num_examples']}: the shard is corrupt; {hint}"
            )
        if verify_checksums and file_sha256(path) != shard["sha256"]:
            raise ValueError(f"{path} fails its sha256 check: the shard is corrupt; {hint}")
    if expected_schema is not None:
        problems = schema_mismatches(manifest["schema"], expected_schema)
        if problems:
            raise ValueError(
                f"{os.path.join(data_dir, MANIFEST_NAME)}: dataset schema does not "
                f"match what the consumer expects ({'; '.join(problems)}); {hint} "
                "with the codecs/config this run uses"
            )
    return RecordDataSource(data_dir, manifest)
