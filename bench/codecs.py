"""Codec benchmark: our jitted JAX codecs against their PyTorch reference at the same small shape.

Each *case* builds one of our codecs (random weights of a small or the real configuration, converted
from a reference model built with the same weights) and its reference, runs both on the same input and
reports the median wall time of ``--iters`` runs after ``--warmup`` (ours: jitted, compile excluded and
reported separately; each run ends with ``block_until_ready``), the ratio ``ours / reference`` (below 1:
ours is faster) and the largest absolute difference of the outputs. The reference side imports torch /
diffusers (a bench, not a test: ``pip install -e .[parity]``); torch runs with ``--torch-threads``
threads (default: as many as JAX's CPU backend uses).

Cases (add one with a function decorated ``@case("name")`` at the ``# --- cases ---`` anchor; it gets
the parsed args and returns a JSON-able dict, ``None`` when skipped):

* ``wan_vae_decode`` -- Wan VAE 2.1 decode (small config: base_dim 32, z 16, 3 latent frames at 16x16
  latents -> 9 frames of 128x128), ours (``mmdit.codecs.wan_vae``, latent frame by latent frame as
  diffusers does) vs ``diffusers.AutoencoderKLWan.decode``.
* ``umt5_encode`` / ``wav2vec2_encode`` / ``clip_vision_encode`` -- the condition encoders
  (``mmdit.encoders``) at small widths (256, 4 layers) vs transformers' ``UMT5EncoderModel`` /
  ``Wav2Vec2Model`` / ``CLIPVisionModel`` with the same weights (converted by the ``mmdit.convert`` family).
* ``wan_vae_decode_gpu`` (``--gpu-day`` only) -- Wan2.1 VAE (real config: base_dim 96, z 16) decode of
  one 3-latent-frame chunk at 512x512 (64x64 latents; ``--gpu-latent``) with random weights, ours only,
  in ms (the first chunk of a clip -> 9 frames, and a steady-state chunk -> 12 frames), f32 and bf16.
  Needs an accelerator for a meaningful number (``--gpu-latent 4`` smoke-tests it on CPU).

Writes JSON (device, versions, one record per case) to ``--out`` (default ``bench/results/codecs.json``;
``bench/results/codecs-gpu.json`` with ``--gpu-day``).

    python bench/codecs.py                        # CPU cases
    python bench/codecs.py --cases wan_vae_decode --iters 3
    python bench/codecs.py --gpu-day              # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES: dict = {}  # name -> (fn, gpu_day)


def case(name: str, gpu_day: bool = False):
    """Registers ``fn(args) -> dict | None`` as the bench case ``name`` (``gpu_day``: only with --gpu-day)."""

    def deco(fn):
        CASES[name] = (fn, gpu_day)
        return fn

    return deco


def timed(fn, warmup: int, iters: int) -> dict:
    """Median / min wall seconds of ``iters`` calls of ``fn()`` after ``warmup`` calls (each call must block)."""
    first = time.perf_counter()
    fn()
    first = time.perf_counter() - first
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "iters": iters}


def compare(name: str, ours, reference, warmup: int, iters: int, **info) -> dict:
    """Times ``ours()`` and ``reference()`` (each returns a numpy array), records both and their ratio."""
    import numpy as np

    out_ours, out_ref = np.asarray(ours()), np.asarray(reference())
    rec = {"case": name, **info, "max_abs_diff": float(np.max(np.abs(out_ours - out_ref))), "shape": list(out_ours.shape)}
    rec["ours"] = timed(ours, warmup, iters)
    rec["reference"] = timed(reference, warmup, iters)
    rec["ratio_ours_over_reference"] = rec["ours"]["median_s"] / rec["reference"]["median_s"]
    print(
        f"{name}: ours {rec['ours']['median_s'] * 1e3:.1f} ms (first call {rec['ours']['first_s']:.1f} s), "
        f"reference {rec['reference']['median_s'] * 1e3:.1f} ms, ratio {rec['ratio_ours_over_reference']:.2f}, "
        f"max |diff| {rec['max_abs_diff']:.2e}",
        flush=True,
    )
    return rec


def use_repo() -> None:
    """Makes ``mmdit`` importable when the package is not installed (``python bench/codecs.py`` from a checkout).

    Call it after importing torch/diffusers: the checkout's top-level ``kernels/`` folder would otherwise
    shadow the PyPI ``kernels`` package that transformers probes for at import time."""
    import importlib.util

    if importlib.util.find_spec("mmdit") is None:
        sys.path.append(REPO)


def _block(x):
    import jax
    import numpy as np

    return np.asarray(jax.block_until_ready(x))


# --- cases ---


def _encoder_pair(model, family, pt_kwargs: dict):
    """Our module + params converted (``family.convert`` over a DictSource) from the torch ``model``."""
    from mmdit.convert.source import DictSource

    hf = dict(model.config.to_dict())
    src = DictSource({k: v.detach().numpy() for k, v in model.state_dict().items()})
    params = family.convert(src, hf, "float32")
    return family.build(family.target(hf)), params


@case("umt5_encode")
def umt5_encode(args):
    """UMT5 encoder (d_model 256, 4 layers, 4 heads, d_ff 640, vocab 4096), batch 2 x 128 tokens."""
    import jax
    import numpy as np
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from mmdit.convert import umt5 as family

    torch.manual_seed(0)
    cfg = dict(vocab_size=4096, d_model=256, d_kv=64, d_ff=640, num_layers=4, num_heads=4, feed_forward_proj="gated-gelu")
    ref = UMT5EncoderModel(UMT5Config(**cfg, dropout_rate=0.0)).eval()
    model, params = _encoder_pair(ref, family, cfg)
    ids = np.random.default_rng(0).integers(0, 4096, (2, 128))
    mask = np.ones((2, 128), bool)
    mask[1, 80:] = False
    fwd = jax.jit(model.apply)

    def reference():
        with torch.no_grad():
            return ref(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64))
            ).last_hidden_state.numpy()

    return compare(
        "umt5_encode", lambda: _block(fwd(params, ids, mask)), reference, args.warmup, args.iters, config=cfg, tokens=[2, 128]
    )


@case("wav2vec2_encode")
def wav2vec2_encode(args):
    """wav2vec2 (base conv stack 7 x 256 channels, hidden 256, 4 layers, stable layer norm), 2 x 1 s at 16 kHz."""
    import jax
    import numpy as np
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from mmdit.convert import wav2vec2 as family

    torch.manual_seed(0)
    cfg = dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        conv_dim=(256,) * 7,
        feat_extract_norm="layer",
        conv_bias=True,
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    )
    ref = Wav2Vec2Model(Wav2Vec2Config(**cfg)).eval()
    model, params = _encoder_pair(ref, family, cfg)
    wave = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32)
    fwd = jax.jit(lambda p, w: model.apply(p, w)["last_hidden_state"])

    def reference():
        with torch.no_grad():
            return ref(torch.from_numpy(wave)).last_hidden_state.numpy()

    return compare(
        "wav2vec2_encode", lambda: _block(fwd(params, wave)), reference, args.warmup, args.iters, config=cfg, samples=[2, 16000]
    )


@case("clip_vision_encode")
def clip_vision_encode(args):
    """CLIP vision (224 px, patch 14, width 256, 4 layers, gelu), batch 2; penultimate hidden state (Wan I2V's)."""
    import jax
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmdit.convert import clip_vision as family

    torch.manual_seed(0)
    cfg = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14)
    ref = CLIPVisionModel(CLIPVisionConfig(**cfg, hidden_act="gelu")).eval()
    model, params = _encoder_pair(ref, family, cfg)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    fwd = jax.jit(lambda p, x: model.apply(p, x)["hidden_states"][-2])

    def reference():
        with torch.no_grad():
            return ref(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2].numpy()

    return compare(
        "clip_vision_encode",
        lambda: _block(fwd(params, nhwc)),
        reference,
        args.warmup,
        args.iters,
        config=cfg,
        images=[2, 224, 224, 3],
    )


def _wan_pair(hf_config: dict, seed: int = 0):
    """A diffusers AutoencoderKLWan with random weights and our codec holding the same weights."""
    import torch
    from diffusers import AutoencoderKLWan

    use_repo()
    from mmdit.codecs.wan_vae import WanVAECodec
    from mmdit.convert import wan_vae as family
    from mmdit.convert.source import DictSource

    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**hf_config).eval()
    with torch.no_grad():  # default init leaves gamma at 1 and small convs: perturb so outputs are not trivial
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    src = DictSource({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    full = dict(ref.config)
    params = family.convert(src, full, "float32")
    codec = WanVAECodec(config=family.target(full)["config"], params=params["params"], fps=16.0)
    return ref, codec


@case("wan_vae_decode")
def wan_vae_decode(args):
    import numpy as np
    import torch

    hf = {"base_dim": 32, "z_dim": 16}
    ref, codec = _wan_pair(hf)
    f, h, w = 3, 16, 16
    z = np.random.default_rng(0).standard_normal((1, f, h, w, 16)).astype(np.float32)
    z_raw = torch.from_numpy(np.ascontiguousarray((z * codec.latents_std + codec.latents_mean).transpose(0, 4, 1, 2, 3)))

    def reference():
        with torch.no_grad():
            return ref.decode(z_raw).sample.numpy().transpose(0, 2, 3, 4, 1)

    def ours():
        return _block(codec.decode(z))

    return compare(
        "wan_vae_decode",
        ours,
        reference,
        args.warmup,
        args.iters,
        config=hf,
        latents=[1, f, h, w, 16],
        torch_threads=torch.get_num_threads(),
    )


@case("wan_vae_decode_gpu", gpu_day=True)
def wan_vae_decode_gpu(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    use_repo()
    from mmdit.codecs.wan_vae import WanVAECodec, WanVAEConfig

    cfg = WanVAEConfig()  # Wan2.1: base_dim 96, z 16
    recs = []
    for dtype in ("float32", "bfloat16"):
        codec = WanVAECodec(config=cfg.to_dict(), params=None, seed=0, fps=16.0, dtype=dtype)
        n = args.gpu_latent
        z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, n, n, cfg.z_dim)), jnp.float32)
        state = codec.decode_init(1, n, n)

        def first(state=state):
            return jax.block_until_ready(codec.decode_chunk(state, z))

        state1, _ = first()

        def steady(state1=state1):
            return jax.block_until_ready(codec.decode_chunk(state1, z))

        for label, fn in (("first_chunk", first), ("steady_chunk", steady)):
            t = timed(fn, args.warmup, args.iters)
            rec = {"case": "wan_vae_decode_gpu", "chunk": label, "dtype": dtype, "latents": [1, 3, n, n, cfg.z_dim], **t}
            rec["ms"] = t["median_s"] * 1e3
            print(f"wan_vae_decode_gpu {label} {dtype}: {rec['ms']:.1f} ms (first call {t['first_s']:.1f} s)", flush=True)
            recs.append(rec)
    return {"case": "wan_vae_decode_gpu", "device": jax.devices()[0].device_kind, "records": recs}


@case("mmaudio_decode")
def mmaudio_decode(args):
    """MMAudio latents -> waveform: VAE decode + BigVGAN, 16 kHz geometry (80 mels, hop 256, 20 latent channels) at
    reduced widths (VAE hidden 64, vocoder 128), 1 s = 32 latents -> 16000 samples; ours (``MMAudioCodec.decode``,
    jitted) vs ``diffusers.MMAudioVAE.decode`` + ``MMAudioVocoder``."""
    import numpy as np
    import torch
    from diffusers import MMAudioVAE, MMAudioVocoder

    from mmdit.codecs.mmaudio import MMAudioCodec
    from mmdit.convert import mmaudio_vae as vae_family
    from mmdit.convert import mmaudio_vocoder as voc_family
    from mmdit.convert.source import DictSource

    vae_cfg = dict(mel_bins=80, latent_channels=20, hidden_channels=64, sample_rate=16000, n_fft=1024, hop_length=256)
    voc_cfg = dict(
        num_mels=80, upsample_initial_channel=128, upsample_rates=(4, 4, 2, 2, 2, 2), upsample_kernel_sizes=(8, 8, 4, 4, 4, 4)
    )
    torch.manual_seed(0)
    vae, voc = MMAudioVAE(**vae_cfg).eval(), MMAudioVocoder(**voc_cfg).eval()
    pairs = []
    for ref, family in ((vae, vae_family), (voc, voc_family)):
        hf = {"_class_name": type(ref).__name__, **dict(ref.config)}
        src = DictSource({k: v.detach().numpy() for k, v in ref.state_dict().items()})
        pairs += [family.target(hf), family.convert(src, hf, np.float32)]
    codec = MMAudioCodec.from_params(*pairs)
    z = np.random.default_rng(0).standard_normal((1, 32, 20)).astype(np.float32)
    z_raw = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 2, 1) / codec.scaling_factor))

    def reference():
        with torch.no_grad():
            return voc(vae.decode(z_raw).sample).sample[:, 0].numpy()

    return compare(
        "mmaudio_decode",
        lambda: codec.decode(z),
        reference,
        args.warmup,
        args.iters,
        vae=vae_cfg,
        vocoder=voc_cfg,
        latents=[1, 32, 20],
        torch_threads=torch.get_num_threads(),
    )


# --- end of cases ---


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", help=f"cases to run (default: all CPU cases); known: {', '.join(CASES)}")
    p.add_argument("--gpu-day", action="store_true", help="run the accelerator cases (gpu_day) instead of the CPU ones")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--gpu-latent", type=int, default=64, help="latent height = width of the --gpu-day case (64: 512x512 px)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    if args.cases:
        unknown = [c for c in args.cases if c not in CASES]
        if unknown:
            p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
        names = args.cases
    else:
        names = [n for n, (_, gpu) in CASES.items() if gpu == args.gpu_day]
    if args.torch_threads or not args.gpu_day:
        try:
            import torch

            torch.set_num_threads(args.torch_threads or max(1, os.cpu_count() or 1))
        except ImportError:
            pass
    records = []
    for name in names:
        rec = CASES[name][0](args)
        if rec is not None:
            records.append(rec)
    out = args.out or os.path.join(REPO, "bench", "results", "codecs-gpu.json" if args.gpu_day else "codecs.json")
    report = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "argv": sys.argv[1:],
        "records": records,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
