"""``mmdit stream``: a talking portrait generated chunk by chunk, written while it grows.

::

    mmdit stream --workdir W --text "hello" --seconds 60 --out talk.mp4            # T2AV
    mmdit stream --workdir W --task a2v --audio speech.wav --out talk.mp4          # A2V, as long as the audio
    mmdit stream --workdir W --task ti2av --image face.png --text "hi" --chunks 50 --raw chunks/

The model is a chunk-causal run (``model.chunk_frames`` and a ``chunk_causal`` mask, e.g.
``configs/demo_stream.py``); :class:`mmdit.sample.streaming.StreamingSampler` denoises one chunk per
jitted call with a KV cache of the sink and the previous chunk, so time and memory per chunk stay
constant however long the stream runs. Each chunk's latents are decoded by the codecs' streaming
decoders on a worker thread, overlapped with the next chunk's DiT (``--no-overlap``: in line), and
appended to a **fragmented MP4** (H.264 + AAC, playable while it grows) and/or raw chunk files
(``--raw DIR``: ``chunk_000000.npz`` + ``manifest.json``). A tqdm line shows each chunk's latency
and the real-time factor (seconds of media per second of wall time).

Inputs: ``--text`` (byte-tokenized, or encoded by ``encoders.text``); ``--audio`` (a2v: the whole
file, encoded once and fed chunk by chunk; the stream ends with the file's last whole chunk);
``--video`` (tv2a: its frames, likewise); ``--image`` (ti2av: the first frame of chunk 0). Length:
``--seconds`` or ``--chunks`` (a2v/tv2a: default the given media's length; t2av/ti2av: required).
Ctrl-C, or a source that ends or stalls (``--source-timeout``), ends the stream cleanly: what was
produced is written and playable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from mmdit.cli.errors import entry_point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdit-stream", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir of a chunk-causal run: restore its EMA params")
    src.add_argument("--bundle", help="serving bundle directory written by mmdit-export (its config and params)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to restore (--workdir; default latest)")
    p.add_argument("--task", default="t2av", choices=("t2av", "ti2av", "a2v", "tv2a"))
    p.add_argument("--text", default="", help="transcript / prompt")
    p.add_argument("--image", help="ti2av: the first frame (PNG/JPEG)")
    p.add_argument("--audio", help="a2v: the driving audio (WAV/FLAC/MP3 or MP4)")
    p.add_argument("--video", help="tv2a: the driving video (MP4)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="stream length in seconds (rounded up to whole chunks)")
    length.add_argument("--chunks", type=int, help="stream length in chunks")
    p.add_argument("--out", help="fragmented MP4 to write (H.264 + AAC)")
    p.add_argument("--raw", help="directory for raw chunk files (npz per chunk + manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: sample.steps)")
    p.add_argument("--shift", type=float, default=None, help="sigma schedule shift (default: sample.shift)")
    p.add_argument("--guidance", action="append", help="CFG scales as for mmdit-sample, e.g. 'text=2'")
    p.add_argument("--cache", choices=("per_step", "clean"), default=None, help="KV cache mode (default: sample.stream_cache)")
    p.add_argument(
        "--positions", choices=("bounded", "absolute"), default=None, help="RoPE positions (default: sample.stream_positions)"
    )
    p.add_argument(
        "--stream-batch",
        action="store_true",
        default=None,
        help="run consecutive chunks' denoising steps as row groups of one forward (more chunks per second, "
        "steps - 1 chunks more latency; per_step cache and bounded positions; default: sample.stream_batch)",
    )
    p.add_argument("--no-overlap", action="store_true", help="decode each chunk in line instead of on a worker thread")
    p.add_argument("--source-timeout", type=float, default=None, help="end the stream if the driving media stalls this long (s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (sampling fields)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the params")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


def _load(args):
    if args.bundle:
        from mmdit.serve.export import load_bundle

        b = load_bundle(args.bundle, verify=not args.no_verify)
        return b.config, b.params
    from mmdit.train.checkpoint import restore_inference_params

    return restore_inference_params(args.workdir, step=args.step, verify=not args.no_verify)


def _raw_conds(cfg, model, text: str):
    """Raw text condition of one row: byte tokens, or features from ``encoders.text``."""
    import numpy as np

    names = [c.name for c in model.spec.conditions]
    if "text" not in names:
        return {}
    if model.text_encoder is not None:
        from mmdit.codecs.text import ByteTokenizer

        return {"text_tokens": ByteTokenizer().encode_batch([text], model.spec.condition("text").length)}
    from mmdit.sample.inputs import condition_encoders

    enc = condition_encoders(cfg, model.spec).get("text")
    if enc is None:
        raise ValueError("the model reads text features but the config has no encoders.text; set it (mmdit convert)")
    feats, mask = enc.encode([text])
    return {"text": np.asarray(feats, np.float32), "text_mask": np.asarray(mask, bool)}


def run(args) -> dict:
    """Streams per the parsed ``args``; returns a summary dict (chunks, seconds, files, timings)."""
    import jax
    import numpy as np

    from mmdit import tasks as tasks_lib
    from mmdit.data.fmp4 import FragmentedMP4Writer, RawChunkWriter
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.inputs import MediaEncoder, parse_guidance
    from mmdit.sample.run import with_overrides
    from mmdit.sample.stream_media import stream_media
    from mmdit.sample.streaming import StreamingSampler, chunks_for_seconds, latent_chunks

    if not args.out and not args.raw:
        raise ValueError("nothing to write: pass --out FILE.mp4 and/or --raw DIR")
    for flag in ("image", "audio", "video"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag} {path}: no such file")
    need = {"a2v": "audio", "tv2a": "video", "ti2av": "image"}.get(args.task)
    if need and getattr(args, need) is None:
        raise ValueError(f"--task {args.task} needs --{need}")
    if args.task in ("t2av", "ti2av") and args.seconds is None and args.chunks is None:
        raise ValueError(f"--task {args.task} generates forever: pass --seconds or --chunks")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise FileNotFoundError(f"--out {args.out}: directory does not exist")

    cfg, params = _load(args)
    cfg = with_overrides(cfg, args.set, fixed_model=True)
    model = DiffusionModel.from_config(cfg)
    ss = StreamingSampler(model, cfg, cache_mode=args.cache, positions=args.positions, stream_batch=args.stream_batch)
    roles = tasks_lib.roles(model.spec, cfg.model)
    media = MediaEncoder.from_config(cfg, model.spec, roles)
    codecs = {roles.visual: media.video_codec}
    if roles.audio is not None:
        codecs[roles.audio] = media.audio_codec

    given, image = None, None
    if args.task == "a2v":
        wave = media.read_audio(args.audio)
        lat = np.asarray(media.audio_codec.encode(wave[None], sample_rate=media.audio_codec.sample_rate), np.float32)
        given = ({roles.audio: a} for a in latent_chunks(lat, ss.layout.latents[roles.audio]))
        if lat.shape[1] < ss.layout.latents[roles.audio]:
            raise ValueError(f"--audio {args.audio}: shorter than one chunk ({ss.seconds_per_chunk:.2f} s)")
    elif args.task == "tv2a":
        from mmdit.data import media as media_io
        from mmdit.data.ingest import resample_frames

        frames, fps, _, _ = media_io.read_mp4(args.video, sample_rate=media.audio_codec.sample_rate)
        frames = media.fit_frames(resample_frames(frames, fps, media.video_codec.fps))
        lat = media.encode_frames(frames)[None]
        given = ({roles.visual: v} for v in latent_chunks(lat, ss.layout.latents[roles.visual]))
    elif args.task == "ti2av":
        image = media.image_latents(args.image)[None, :1]
    num = args.chunks if args.chunks is not None else (chunks_for_seconds(args.seconds, ss) if args.seconds else None)
    if num is not None and num < 1:
        raise ValueError("--chunks / --seconds must give at least one chunk")

    state = ss.start(
        params,
        jax.random.key(args.seed),
        task=args.task,
        batch=1,
        raw_conds=_raw_conds(cfg, model, args.text),
        image_latents=image,
        steps=args.steps,
        shift=args.shift,
        guidance=parse_guidance(args.guidance),
    )
    h, w = media.size
    sample_rate = media.audio_codec.sample_rate if roles.audio is not None else None
    mp4 = FragmentedMP4Writer(args.out, media.video_codec.fps, sample_rate, w, h) if args.out else None
    raw = (
        RawChunkWriter(args.raw, fps=media.video_codec.fps, sample_rate=sample_rate, meta={"task": args.task})
        if args.raw
        else None
    )
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, unit="chunk", desc=f"streaming {args.task}", file=sys.stderr)

    def sink(mc):  # on the decode thread, in chunk order: the writers see each chunk once
        frames = None if mc.frames is None else mc.frames[0]
        audio = None if mc.audio is None else mc.audio[0]
        if mp4 is not None:
            mp4.write(frames, audio)
        if raw is not None and mc.final:
            raw.write_tail(frames=frames, audio=audio)
        elif raw is not None:
            latents = {k: v[0] for k, v in mc.latents.items()}
            raw.write(mc.index, frames=frames, audio=audio, latents=latents)

    latencies, produced, t_start = [], 0, time.perf_counter()
    chunks = ss.stream(params, state, given=given, num_chunks=num, source_timeout=args.source_timeout)
    try:
        # closing(): the decode worker is joined before the writers close, even on Ctrl-C
        media_chunks = contextlib.closing(stream_media(chunks, codecs, overlap=not args.no_overlap, sink=sink))
        with media_chunks as media_iter:
            for mc in media_iter:
                if mc.final:
                    continue
                produced += 1
                latencies.append(mc.t_dit)
                if bar is not None:
                    wall = time.perf_counter() - t_start
                    bar.update(1)
                    bar.set_postfix(chunk_ms=f"{1e3 * mc.t_dit:.0f}", rtf=f"{produced * ss.seconds_per_chunk / wall:.2f}")
    except KeyboardInterrupt:
        print("mmdit-stream: interrupted; closing the output", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        if mp4 is not None:
            mp4.close()
        if raw is not None:
            raw.close()
    wall = time.perf_counter() - t_start
    summary = {
        "task": args.task,
        "chunks": produced,
        "seconds": produced * ss.seconds_per_chunk,
        "wall_s": wall,
        "real_time_factor": produced * ss.seconds_per_chunk / wall if wall > 0 else None,
        "first_chunk_s": latencies[0] if latencies else None,
        "ttbc_median_s": float(np.median(latencies[1:])) if len(latencies) > 1 else None,
        "out": args.out,
        "raw": args.raw,
    }
    for path in (args.out, args.raw):
        if path:
            print(path, flush=True)
    return summary


@entry_point("mmdit-stream")
def main(argv=None) -> int:
    """Console entry point ``mmdit-stream`` (see the module docstring)."""
    args = _parser().parse_args(argv)
    summary = run(args)
    print(
        f"mmdit-stream: {summary['chunks']} chunks = {summary['seconds']:.2f} s in {summary['wall_s']:.1f} s "
        f"(real-time factor {summary['real_time_factor'] or 0:.2f})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
