"""``mmdit data ingest``: a directory of talking-video MP4s (or WAV + transcript) -> the training records
of a config's model, per host, resumable.

**Inputs.** Every ``*.mp4`` / ``.mov`` / ``.m4v`` / ``.mkv`` / ``.webm`` (video + audio) and ``*.wav`` /
``.flac`` (audio only) under ``in_dir``, sorted by relative path (hidden files ignored). A sidecar
caption beside a clip: ``clip.json`` (``{"text": ...}``) first, else ``clip.txt``, else ``""``.

**Per source** (:func:`read_windows`): decode (audio resampled to ``codecs.audio.sample_rate``, video
to ``codecs.video.fps`` by nearest frame), check (corrupt, no audio stream, audio/video lengths apart,
silence: counted skips as in :mod:`mmdit.data.ingest`), then cut **clip-length windows**: the model's
latent shape fixes the frames ``N`` and samples ``T`` of a clip; window ``k`` starts at ``k · window_s``
(``long_clips="windows"``, the default: every whole window, the remainder dropped), or one window only
(``"first"``, or ``"centre"``: centre-cut). A source shorter than one window is a counted ``too_short``
skip (the schema has no padding mask for streams). Each window becomes one record
(:class:`mmdit.data.record_fields.RecordMaker`: the schema's fields, face box, speaking labels); the
caption is repeated on every window of a source.

**Per host.** Process ``i`` of ``n`` (``--process-index/--process-count``; default the JAX process)
ingests sources ``i, i+n, i+2n, ...`` in chunks of ``clips_per_shard`` sources; chunk ``k`` becomes the
shard ``{prefix}-p{i}of{n}-{k:05d}.array_record`` (written as ``*.tmp``, fsynced, renamed; no shard
when every source of the chunk was skipped).

**Resuming.** After each chunk the host rewrites its done-list ``ingest-p{i}of{n}.json`` atomically
(the chunk's shard, schema, skips and counts). A killed ingest (even SIGKILL) rerun with the same
command deletes its ``*.tmp`` and any shard its done-list does not hold (killed between the rename and
the done-list), then continues with the first chunk not in the done-list: no source twice, none lost.
The done-list carries a fingerprint of the config's codecs / model / encoders, the sources and the
options; a rerun with other settings is refused (``--overwrite`` starts over).

**Commit.** The host that finds every host's done-list complete writes ``manifest.json``
(:mod:`mmdit.data.records` format, atomically): all shards in host then chunk order, the merged schema,
``skipped`` ``{reason: count}`` and ``skipped_sources``, and ``metadata.counts`` (``sources``, ``records``,
``windows_dropped``, ``no_face`` (windows that got the fallback face box), ``audio_only``, ``speaking``).
Until then the directory holds no dataset (readers say the writer did not finish).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from mmdit.data.codec_stamp import codecs_stamp
from mmdit.data.ingest import read_checked_mp4
from mmdit.data.record_fields import RecordMaker, Window
from mmdit.data.records import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    RECORD_FORMAT_VERSION,
    SHARD_SUFFIX,
    SKIP_CORRUPT,
    SKIP_TOO_SHORT,
    TMP_SUFFIX,
    WRITER_OPTIONS,
    ExampleSchema,
    SkipExample,
    encode_example,
    example_schema,
    merge_spec,
    validate_example,
)
from mmdit.util.files import file_sha256, fsync_path, write_json_atomic
from mmdit.util.lock import DirLock
from mmdit.util.plain import plain

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm")
AUDIO_EXTS = (".wav", ".flac")
LONG_CLIPS = ("windows", "first", "centre")
PREFIX = "ingest"
COUNTS = ("sources", "records", "windows_dropped", "no_face", "audio_only", "speaking")


def find_sources(in_dir: str) -> list[str]:
    """Relative paths of the media under ``in_dir`` (module docstring), sorted."""
    if not os.path.isdir(in_dir):
        raise FileNotFoundError(f"--in {in_dir}: input directory does not exist")
    out = sorted(
        os.path.relpath(os.path.join(root, f), in_dir)
        for root, _, files in os.walk(in_dir)
        for f in files
        if f.lower().endswith(VIDEO_EXTS + AUDIO_EXTS) and not f.startswith(".")
    )
    if not out:
        raise ValueError(f"--in {in_dir}: no {'/'.join(VIDEO_EXTS + AUDIO_EXTS)} files found (hidden files are ignored)")
    return out


def caption_for(path: str) -> str:
    """The sidecar caption of ``path``: ``<stem>.json`` ``{"text": ...}``, else ``<stem>.txt``, else ``""``."""
    stem = os.path.splitext(path)[0]
    if os.path.exists(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise SkipExample("bad_caption", f"{stem}.json is not JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("text", ""), str):
            raise SkipExample("bad_caption", f'{stem}.json must be {{"text": "..."}}')
        return meta.get("text", "").strip()
    if os.path.exists(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            return f.read().strip()
    return ""


def _window_starts(seconds: float, window_s: float, long_clips: str) -> list[float]:
    """Start times of the windows of a ``seconds``-long source (module docstring)."""
    count = int(np.floor(seconds / window_s + 1e-6))
    if count == 0:
        return []
    if long_clips == "windows":
        return [k * window_s for k in range(count)]
    if long_clips == "centre":
        return [max(0.0, (seconds - window_s) / 2)]
    return [0.0]


def read_windows(path: str, maker: RecordMaker, long_clips: str = "windows", schema: ExampleSchema | None = None):
    """Decodes and checks one source and cuts its windows.

    Returns ``(windows, dropped)``: :class:`mmdit.data.record_fields.Window` list (frames at the codec
    fps, source size; None for audio-only sources) and the whole windows left out by ``long_clips``.
    Raises :class:`SkipExample` for a bad or too short source."""
    schema = schema or ExampleSchema()
    fps, sr = float(maker.video_codec.fps), int(maker.sample_rate)
    n, t = maker.num_frames, maker.num_samples
    if path.lower().endswith(AUDIO_EXTS):
        import librosa

        try:
            wave, _ = librosa.load(path, sr=sr, mono=True)
        except Exception as e:  # noqa: BLE001 -- soundfile/audioread raise many types
            raise SkipExample(SKIP_CORRUPT, f"cannot decode audio ({type(e).__name__}: {e})") from None
        frames, seconds = None, len(wave) / sr
        validate_example({}, schema, waveform=wave)
    else:
        frames, wave = read_checked_mp4(path, schema, fps, sr)
        seconds = min(len(frames) / fps, len(wave) / sr)
    starts = _window_starts(seconds, maker.window_s, long_clips)
    windows = []
    for s in starts:
        a = int(round(s * sr))
        w = wave[a : a + t]
        f = None
        if frames is not None:
            i = int(round(s * fps))
            f = frames[i : i + n]
            if len(f) < n:
                continue
        if len(w) < t:
            continue
        windows.append(Window(f, np.ascontiguousarray(w, np.float32), s))
    if not windows:
        raise SkipExample(SKIP_TOO_SHORT, f"{seconds:.3f}s is shorter than one clip ({maker.window_s:.3f}s, the model's length)")
    return windows, int(np.floor(seconds / maker.window_s + 1e-6)) - len(windows)


def _write_shard(out_dir: str, name: str, examples: list[dict]) -> dict[str, Any]:
    """Writes ``examples`` to ``out_dir/name`` via ``name.tmp`` + fsync + rename; returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = os.path.join(out_dir, name)
    tmp = final + TMP_SUFFIX
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    for ex in examples:
        writer.write(encode_example(ex))
    if not writer.ok():
        writer.close()
        os.remove(tmp)
        raise OSError(f"ArrayRecord writer failed on {tmp} (disk full?)")
    writer.close()
    fsync_path(tmp)
    entry = {"file": name, "num_examples": len(examples), "num_bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}
    os.replace(tmp, final)
    fsync_path(out_dir)
    return entry


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(cfg, long_clips: str, clips_per_shard: int) -> str:
    """What decides the records' content: codecs, encoders, model, clip, and the ingest options."""
    parts = {k: _plain(cfg.get(k)) for k in ("codecs", "encoders", "model", "clip")}
    return _fingerprint({**parts, "long_clips": long_clips, "clips_per_shard": clips_per_shard})


def _plain(x):
    return plain(x) if x is not None else None


def state_name(index: int, count: int) -> str:
    return f"ingest-p{index}of{count}.json"


def shard_name(index: int, count: int, chunk: int) -> str:
    return f"{PREFIX}-p{index}of{count}-{chunk:05d}{SHARD_SUFFIX}"


def ingest(
    cfg,
    in_dir: str,
    out_dir: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    clips_per_shard: int | None = None,
    long_clips: str = "windows",
    overwrite: bool = False,
    progress: bool = True,
    maker: RecordMaker | None = None,
) -> dict[str, Any]:
    """Ingests this host's share of ``in_dir`` into ``out_dir`` (module docstring).

    Returns ``{"host": this host's counts and skips, "manifest": the committed manifest or None
    while other hosts are unfinished}``. Holds the per-host lock ``out_dir/.ingest-p{i}of{n}.lock``
    (a second ingest of the same share fails at once). Raises ValueError naming the flag on bad
    arguments or when ``out_dir`` holds another ingest.
    """
    from mmdit import config_spec

    if not (0 <= process_index < process_count):
        raise ValueError(f"--process-index {process_index} must be in [0, --process-count {process_count})")
    if long_clips not in LONG_CLIPS:
        raise ValueError(f"--long-clips {long_clips!r}: choose one of {', '.join(LONG_CLIPS)}")
    if clips_per_shard is not None and clips_per_shard < 1:
        raise ValueError(f"--clips-per-shard {clips_per_shard} must be >= 1")
    clips_per_shard = int(clips_per_shard or config_spec.data_spec(cfg).examples_per_shard)
    sources = find_sources(in_dir)
    mine = sources[process_index::process_count]
    maker = maker or RecordMaker(cfg)
    common = config_fingerprint(cfg, long_clips, clips_per_shard)
    me = (process_index, process_count)
    state_path = os.path.join(out_dir, state_name(*me))
    with DirLock(
        out_dir,
        command=f"mmdit data ingest -> {os.path.abspath(out_dir)} (host {me[0]} of {me[1]})",
        name=f".ingest-p{me[0]}of{me[1]}.lock",
    ):
        if overwrite:
            _remove_host_files(out_dir, *me, state_path)
        state = _load_state(state_path, out_dir, common, mine)
        _remove_uncommitted(out_dir, *me, state)
        chunks = [mine[k : k + clips_per_shard] for k in range(0, len(mine), clips_per_shard)]
        bar, totals = None, {"records": 0, "skipped": 0}  # this run's, for the progress bar
        if progress:
            from tqdm import tqdm

            done = sum(len(c) for c in chunks[: len(state["chunks"])])
            bar = tqdm(total=len(mine), initial=done, desc=f"ingest host {me[0]}/{me[1]}", unit="clip", dynamic_ncols=True)
        for k in range(len(state["chunks"]), len(chunks)):
            state["chunks"].append(_ingest_chunk(maker, in_dir, out_dir, me, k, chunks[k], long_clips, bar, totals))
            state["done"] = k == len(chunks) - 1
            write_json_atomic(state_path, state)  # the chunk's commit point
        if not chunks or not state["done"]:
            state["done"] = True
            write_json_atomic(state_path, state)
        if bar is not None:
            bar.close()
    host = _summarise([state])
    manifest = commit_if_complete(out_dir, process_count, common, cfg)
    return {"host": host, "manifest": manifest}


def _ingest_chunk(maker, in_dir, out_dir, me, k, paths, long_clips, bar=None, totals=None) -> dict[str, Any]:
    """Ingests chunk ``k`` (the sources ``paths``) of host ``me = (index, count)``: its shard and done-list entry."""
    examples, skipped, counts = [], [], dict.fromkeys(COUNTS, 0)
    for rel in paths:
        path = os.path.join(in_dir, rel)
        counts["sources"] += 1
        try:
            windows, dropped = read_windows(path, maker, long_clips)
            records, no_face = maker.records(windows, caption_for(path), rel)
            for r in records:
                validate_example(r, ExampleSchema())  # NaN / Inf latents are a counted skip
        except SkipExample as e:
            log.warning("skipping %s: %s", rel, e)
            skipped.append({"source": rel, "reason": e.reason, "detail": e.detail})
        else:
            examples += records
            counts["records"] += len(records)
            counts["windows_dropped"] += dropped
            counts["no_face"] += no_face
            counts["audio_only"] += sum(int(r["has_video"]) == 0 for r in records)
            counts["speaking"] += sum(int(r["speaking"]) for r in records)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(records=totals["records"] + counts["records"], skipped=totals["skipped"] + len(skipped))
    if totals is not None:
        totals["records"] += counts["records"]
        totals["skipped"] += len(skipped)
    schema, key_counts = {}, {}
    for ex in examples:
        for key, s in example_schema(ex).items():
            schema[key] = merge_spec(key, schema[key], s) if key in schema else s
            key_counts[key] = key_counts.get(key, 0) + 1
    shard = _write_shard(out_dir, shard_name(*me, k), examples) if examples else None
    return {"chunk": k, "shard": shard, "schema": schema, "key_counts": key_counts, "skipped": skipped, "counts": counts}


def _load_state(path: str, out_dir: str, common: str, mine: list[str]) -> dict[str, Any]:
    fresh = {"fingerprint": common, "sources": _fingerprint(mine), "chunks": [], "done": False}
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
            raise ValueError(
                f"--out {out_dir} already holds a dataset ({MANIFEST_NAME}) that this ingest did not start; "
                "pass --overwrite to replace it or choose another --out"
            )
        return fresh
    with open(path) as f:
        state = json.load(f)
    if state.get("fingerprint") != common or state.get("sources") != fresh["sources"]:
        raise ValueError(
            f"--out {out_dir} holds an ingest ({os.path.basename(path)}) of other inputs or settings (config codecs/model/"
            "encoders, --long-clips, --clips-per-shard, or the files in --in changed); pass --overwrite to start over "
            "or choose another --out"
        )
    return state


def _remove_uncommitted(out_dir: str, index: int, count: int, state: dict) -> None:
    """Deletes this host's ``*.tmp`` shards and final-named shards its done-list does not hold."""
    kept = {c["shard"]["file"] for c in state["chunks"] if c["shard"]}
    head = f"{PREFIX}-p{index}of{count}-"
    for name in os.listdir(out_dir):
        if name.startswith(head) and (name.endswith(TMP_SUFFIX) or (name.endswith(SHARD_SUFFIX) and name not in kept)):
            os.remove(os.path.join(out_dir, name))


def _remove_host_files(out_dir: str, index: int, count: int, state_path: str) -> None:
    """``--overwrite``: this host's done-list and shards, and the committed manifest."""
    for path in (os.path.join(out_dir, MANIFEST_NAME), state_path):
        if os.path.exists(path):
            os.remove(path)
    _remove_uncommitted(out_dir, index, count, {"chunks": []})


def _summarise(states: list[dict]) -> dict[str, Any]:
    counts = dict.fromkeys(COUNTS, 0)
    skipped: dict[str, int] = {}
    for st in states:
        for c in st["chunks"]:
            for k, v in c["counts"].items():
                counts[k] = counts.get(k, 0) + v
            for s in c["skipped"]:
                skipped[s["reason"]] = skipped.get(s["reason"], 0) + 1
    return {"counts": counts, "skipped": dict(sorted(skipped.items()))}


def commit_if_complete(out_dir: str, process_count: int, common: str, cfg=None) -> dict[str, Any] | None:
    """Writes ``manifest.json`` when every host's done-list is complete and of this ingest; returns it
    (None while a host is unfinished)."""
    states = []
    for i in range(process_count):
        path = os.path.join(out_dir, state_name(i, process_count))
        if not os.path.exists(path):
            return None
        with open(path) as f:
            st = json.load(f)
        if not st.get("done") or st.get("fingerprint") != common:
            return None
        states.append(st)
    shards, schema, key_counts, skip_list = [], {}, {}, []
    for st in states:
        for c in st["chunks"]:
            if c["shard"]:
                shards.append(c["shard"])
            for key, s in c["schema"].items():
                schema[key] = merge_spec(key, schema[key], s) if key in schema else s
                key_counts[key] = key_counts.get(key, 0) + c["key_counts"][key]
            skip_list += c["skipped"]
    summary = _summarise(states)
    total = sum(s["num_examples"] for s in shards)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "record_format": RECORD_FORMAT_VERSION,
        "num_examples": total,
        "shards": shards,
        "producer": "mmdit data ingest",
        "metadata": {
            "process_count": process_count,
            "fingerprint": common,
            "counts": summary["counts"],
            "codecs": codecs_stamp(cfg) if cfg is not None else None,
            "clip_seconds": float(cfg.clip.seconds) if cfg is not None else None,
        },
        "schema": {k: {**s, "optional": key_counts[k] < total} for k, s in sorted(schema.items())},
        "skipped": summary["skipped"],
        "skipped_sources": skip_list,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest
