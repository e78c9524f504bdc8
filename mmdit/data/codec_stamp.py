"""Which codecs encoded a dataset's latents: the stamp writers put in ``manifest.json`` and the check readers make.

Records hold latents, not media: the same bytes decode to something else under another codec (another
``residual_gain``, DCT size, mel count...). ``mmdit-data synth`` and ``mmdit data ingest`` therefore write the
``codecs`` section that encoded them into the manifest's ``metadata.codecs`` (:func:`codecs_stamp`: the
config's codecs with every default filled in, plain JSON), and a reader compares it with its own config
(:func:`check_codecs`) before it trains on, distils from or evaluates the latents.
"""

from __future__ import annotations

import json

from mmdit import config_spec
from mmdit.data.records import read_manifest
from mmdit.util.plain import plain

__all__ = ["codecs_stamp", "codec_differences", "check_codecs"]


def codecs_stamp(cfg) -> dict:
    """The ``codecs`` section that encodes ``cfg``'s records, defaults filled in (plain JSON): what a
    writer stores as the manifest's ``metadata.codecs``."""
    return json.loads(json.dumps(plain(config_spec.complete(cfg).codecs) or {}))


def codec_differences(written: dict, now: dict) -> list[str]:
    """``codecs.<codec>.<field>`` names (sorted) whose value in the stamp ``written`` differs from ``now``'s
    (:func:`codecs_stamp` of the reader's config), and codecs only one side has. A field ``written`` leaves
    out is taken to be at its default (stamps of older ``mmdit data ingest`` versions held the config's
    codecs as written, without defaults)."""
    out = set()
    for codec in set(written) | set(now):
        a, b = written.get(codec), now.get(codec)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out.add(f"codecs.{codec}")
            continue
        out.update(f"codecs.{codec}.{f}" for f in a if a[f] != b.get(f))
    return sorted(out)


def check_codecs(cfg, data_dir: str, *, require_stamp: bool, fix: str, manifest: dict | None = None) -> str | None:
    """Compares the ``metadata.codecs`` stamp of ``data_dir``'s manifest (``manifest`` when the caller has read it
    already) with ``cfg``'s codecs.

    ValueError naming ``data_dir``, the differing fields and ``fix`` (what the caller's user should do) when
    they differ, or when the stamp is missing and ``require_stamp``. Returns a note (for the log) when the
    stamp is missing and not required (records from an older mmdit or another writer: trusted), else None."""
    manifest = read_manifest(data_dir) if manifest is None else manifest
    written = (manifest.get("metadata") or {}).get("codecs")
    if written is None:
        if require_stamp:
            raise ValueError(f"{data_dir}: these records do not say which codecs encoded them (written by an older mmdit); {fix}")
        return f"note: {data_dir}/manifest.json does not say which codecs encoded its latents; trusting that config's codecs"
    diff = codec_differences(written, codecs_stamp(cfg))
    if diff:
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise ValueError(
            f"{data_dir}: these records were encoded with other codecs than the config's ({shown} differ: "
            f"the latents would be read as another codec's); {fix}"
        )
    return None
