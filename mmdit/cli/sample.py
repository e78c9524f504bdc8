"""``mmdit-sample``: sample talking-portrait clips (H.264 + AAC MP4s) from a workdir or a bundle.

::

    mmdit-sample --workdir W [--task t2av,ti2av] [--text "..."] [--out W/samples]
    mmdit-sample --bundle B --task ti2av --text "..." --image face.png --out OUT
    mmdit-sample --bundle B --task a2v --audio speech.wav --text "..." --out OUT
    mmdit-sample --bundle B --task tv2a --video clip.mp4 --guidance "text=video:4,audio:3" --out OUT
    mmdit-sample --bundle B --task inpaint --video clip.mp4 --inpaint audio:1.0-2.5 --out OUT
    mmdit-sample --bundle B --task tr2av --text "..." --ref-audio voice.wav --out OUT
    mmdit-sample --bundle B --task ti2av --audio speech.wav --silence 0:1.5 --out OUT

Model: ``--workdir`` restores the EMA params and config of a training run
(``mmdit.train.checkpoint.restore_inference_params``; of a staged run, its last stage with a checkpoint); ``--bundle`` uses a serving bundle alone
(config, params and the exported step, ``mmdit/serve/export.py``).

Inputs a task needs (the content of its known streams, and the text): ``--text``; ``--image`` PNG/JPEG
(ti2av: the first frame, centre-cropped and resized to the model's frame size); ``--video`` MP4
(tv2a, inpaint; resampled to the codec's fps and resized, its first frames used; its audio track
also serves as the audio when ``--audio`` is absent); ``--audio`` WAV/FLAC/MP3 (librosa) or MP4
(PyAV), resampled to the audio codec's rate, cut or zero-padded to the clip length. A missing input
is taken from the workdir's eval records (``W/data/eval``) when there are some, else it is an error
naming the flag. Inputs are encoded with the config's codecs and text is byte-tokenized to
``model.conditions.text.length`` (``mmdit/sample/inputs.py``).

Conditions: ``--ref-audio`` (tr2av's reference voice, ``ref_audio``: codecs.audio latents, cut or padded
to ``model.conditions.ref_audio.length``); ``--audio`` also feeds an ``audio_features`` condition
(TalkingMachines) or condition stream (Mirage) through ``encoders.audio_features`` (wav2vec2).
``--inpaint STREAM:START-END`` picks the seconds task ``inpaint`` regenerates (the rest of every
generated stream is kept bit-exact, so ``--video`` / ``--audio`` must give it); ``--silence START:END``
marks listening phases where a model with ``silence_embedding`` gets its silence embedding;
``--face-box X0,Y0,X1,Y1`` is the face region of a ``face_local`` model (default: the eval records').

Outputs: ``OUT/<task>_<i>.mp4`` (decoded video at the codec's fps + decoded audio) and
``OUT/samples.json`` (files, task, text, seed, sampler settings, input sources), both written
atomically (``mmdit.sample.run.sample_to_files``); the MP4 paths are printed, one per line.
Progress goes to stderr (tqdm).
"""

from __future__ import annotations

import argparse
import os
import sys

from mmdit.cli.errors import entry_point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdit-sample", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir: restore its EMA params (latest checkpoint)")
    src.add_argument("--bundle", help="serving bundle directory written by mmdit-export")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to restore (--workdir; default latest)")
    p.add_argument("--task", action="append", help="task(s), comma-separated or repeated (default: sample.tasks)")
    p.add_argument("--text", help="transcript / prompt (byte-tokenized)")
    p.add_argument("--image", help="first frame for ti2av (PNG/JPEG)")
    p.add_argument(
        "--audio",
        help="driving audio (WAV/FLAC/MP3 or MP4): the audio stream for a2v, and the audio-feature condition or "
        "condition stream (TalkingMachines, Mirage; encoded with encoders.audio_features)",
    )
    p.add_argument("--video", help="driving video for tv2a / inpaint (MP4)")
    p.add_argument("--ref-audio", help="reference audio for tr2av (voice timbre; WAV/FLAC/MP3 or MP4, codecs.audio latents)")
    p.add_argument(
        "--inpaint",
        action="append",
        metavar="STREAM:START-END",
        help="task inpaint: regenerate these seconds of a stream and keep the rest, e.g. 'audio:1.0-2.5' "
        "(several spans comma-separated, or repeat the flag; default: random spans)",
    )
    p.add_argument(
        "--silence",
        action="append",
        metavar="START:END",
        help="listening phases in seconds, e.g. '0:1.5,3.0:4.0': the learned silence embedding replaces the audio "
        "condition there (model.conditions.<c>.silence_embedding)",
    )
    p.add_argument(
        "--face-box",
        metavar="X0,Y0,X1,Y1",
        help="face region as fractions of the frame for face-local audio cross-attention "
        "(model.conditions.<c>.face_local; default: the eval records' face boxes, else the whole frame)",
    )
    p.add_argument("--num", type=int, default=None, help="samples per task (default: sample.num_per_task)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: config seed)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: sample.steps)")
    p.add_argument("--shift", type=float, default=None, help="sigma schedule shift (default: sample.shift)")
    p.add_argument(
        "--stream-shift",
        action="append",
        metavar="STREAM=SHIFT",
        help="per-stream schedule shift overriding --shift, e.g. 'audio=1' (smaller: denoised ahead; "
        "default: sample.stream_shift)",
    )
    p.add_argument(
        "--guidance", action="append", help="CFG scales: 'text=3', 'text=video:4,audio:3', ';'-separated conditions, or 'none'"
    )
    p.add_argument("--guidance-schedule", choices=("constant", "cosine"), default=None)
    p.add_argument(
        "--guidance-interval",
        metavar="LO,HI",
        default=None,
        help="guide only the steps whose sigma is in (LO, HI], e.g. '0.5,1' (default: sample.guidance_interval)",
    )
    p.add_argument("--guidance-mode", choices=("nested", "independent"), default=None)
    p.add_argument("--out", help="output directory (default: WORKDIR/samples; required with --bundle)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the sha256 check of the checkpoint / bundle params (huge models)"
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


def _load(args):
    """-> (cfg, params, step_fn or None, source description), from ``--bundle`` or ``--workdir``."""
    if args.bundle:
        from mmdit.serve.export import load_bundle

        b = load_bundle(args.bundle, verify=not args.no_verify)
        return b.config, b.params, b.step_fn, f"bundle {b.path}"
    try:
        from mmdit.train.checkpoint import restore_inference_params
    except ImportError as e:
        raise ValueError(f"--workdir needs mmdit.train.checkpoint ({e}); use --bundle instead") from None
    from mmdit.train.stages import resolve_workdir

    run_dir = resolve_workdir(args.workdir)  # a staged run: its last stage with a checkpoint
    cfg, params = restore_inference_params(run_dir, step=args.step, verify=not args.no_verify)
    return cfg, params, None, f"workdir {os.path.abspath(run_dir)}"


def _note(message: str) -> None:
    print(f"mmdit-sample: {message}", file=sys.stderr)


def run(args) -> list[str]:
    """Samples every requested task of parsed ``args``; returns the MP4 paths. Raises ValueError on bad inputs."""
    from mmdit.sample.inputs import parse_face_box, parse_guidance, parse_regions, parse_silence, parse_stream_shift
    from mmdit.sample.run import sample_to_files

    from mmdit.sample.run import check_sampling_flags

    guidance = parse_guidance(args.guidance)
    stream_shift = parse_stream_shift(args.stream_shift)
    if args.bundle and not args.out:
        raise ValueError("--out is required with --bundle")
    check_sampling_flags(num=args.num, steps=args.steps, shift=args.shift, stream_shift=stream_shift)  # before loading
    if args.step is not None and args.bundle:
        raise ValueError("--step selects a checkpoint of --workdir; a bundle holds one step (re-export for another)")
    if args.text is not None:
        try:
            args.text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--text is not valid UTF-8 (check the terminal's locale or the file it came from)") from None
    for flag in ("image", "audio", "video", "ref_audio"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    regions, silence = parse_regions(args.inpaint), parse_silence(args.silence)  # before loading
    face_box = parse_face_box(args.face_box)
    cfg, params, step_fn, source = _load(args)
    tasks = [t for v in args.task for t in v.split(",")] if args.task else None
    return sample_to_files(
        cfg,
        params,
        args.out or os.path.join(args.workdir, "samples"),
        step_fn=step_fn,
        source=source,
        overrides=args.set,
        tasks=tasks,
        num=args.num,
        seed=args.seed,
        text=args.text,
        image=args.image,
        audio=args.audio,
        video=args.video,
        ref_audio=args.ref_audio,
        regions=regions,
        silence=silence,
        face_box=face_box,
        eval_dir=os.path.join(args.workdir, "data", "eval") if args.workdir else None,
        steps=args.steps,
        shift=args.shift,
        stream_shift=stream_shift,
        guidance=guidance,
        guidance_mode=args.guidance_mode,
        guidance_schedule=args.guidance_schedule,
        guidance_interval=args.guidance_interval,
        progress=not args.no_progress,
        on_file=lambda path: print(path, flush=True),
        note=_note,
    )


@entry_point("mmdit-sample")
def main(argv=None) -> int:
    """Console entry point ``mmdit-sample`` (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 -- name the input flag when PIL refuses an image
        if type(e).__name__ == "DecompressionBombError" and args.image:
            raise ValueError(f"--image {args.image}: too large to decode safely ({e}); pass a smaller image") from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
