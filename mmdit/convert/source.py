"""Reading a Hugging Face checkpoint directory one tensor at a time.

A *source directory* is what ``save_pretrained`` writes (and what ``huggingface-cli download``
fetches): ``config.json`` plus the weights as ``*.safetensors`` -- one file, or several shards listed
by a ``*.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). A diffusers
*pipeline* directory (``model_index.json`` with one subfolder per component: ``transformer/``,
``vae/``, ``text_encoder/``...) is resolved to one component by :func:`mmdit.convert.run.convert_dir`.

:class:`TensorSource` knows every tensor's name, shape, dtype and file from the safetensors headers
alone; :meth:`TensorSource.get` maps one file, copies one tensor out, and unmaps the file again, so a
conversion holds at most one source tensor (in float32) besides what it has already converted --
peak memory is the output plus the largest tensor, not the input.

Every problem with the input raises :class:`ConvertError`, whose message names the file (and the
tensor or config field) and says what to do.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
PIPELINE_INDEX = "model_index.json"  # diffusers pipeline: one subfolder per component
INDEX_SUFFIX = ".safetensors.index.json"
WEIGHTS_SUFFIX = ".safetensors"

# safetensors dtype codes -> numpy dtypes we accept as weights (upcast to float32 by ``get``).
FLOAT_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Stored but never a float weight: readable with ``get(name, raw=True)`` (e.g. position-id buffers).
INT_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
}
# Quantised / complex storage: a plain upcast would silently give wrong weights (float8 checkpoints
# carry separate scales), so these are refused.
REFUSED_DTYPES = {
    "F8_E4M3": "float8 (a quantised checkpoint: its weights need separate scale tensors)",
    "F8_E5M2": "float8 (a quantised checkpoint: its weights need separate scale tensors)",
    "F8_E8M0": "float8 scale format",
    "F4": "float4 (a quantised checkpoint)",
    "F6_E2M3": "float6 (a quantised checkpoint)",
    "F6_E3M2": "float6 (a quantised checkpoint)",
    "C64": "complex64",
    "C128": "complex128",
}
DOWNLOAD_HINT = "download the bfloat16/float32 release of the model (the diffusers/transformers format) instead"


class ConvertError(ValueError):
    """Bad input to a conversion; the message names the file/field and the fix."""


def read_json(path: str, what: str = "file") -> dict:
    """The JSON object in ``path``; ConvertError naming the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path} not found ({what})")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e}); re-download it") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object, found {type(obj).__name__}; re-download it")
    return obj


def read_config(directory: str) -> dict:
    """``directory/config.json`` (the Hugging Face config of one model)."""
    return read_json(
        os.path.join(directory, CONFIG_FILE),
        "the model's Hugging Face config; point --from at the folder save_pretrained wrote",
    )


class TensorSource:
    """Read-only view of the tensors of one Hugging Face model folder.

    ``names()`` lists tensor names (sorted); ``shape(name)`` / ``dtype(name)`` come from the
    safetensors headers (``dtype`` is the stored numpy dtype, ``ml_dtypes.bfloat16`` for BF16);
    ``get(name)`` reads that one tensor: floating tensors upcast to float32, anything else refused
    unless ``raw=True``. ``files()`` lists the weight and index files (paths relative to the folder)
    for the manifest's checksums.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise ConvertError(f"{directory}: not a directory; --from takes the folder holding config.json and *.safetensors")
        self._index_files: list[str] = []
        self._entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (file, dtype code, shape)
        weight_files = self._weight_files()
        for rel in weight_files:
            self._read_header(rel)
        self.used: set[str] = set()  # names read through get(): run.py reports the ones never read

    # -- discovery ------------------------------------------------------------------------------

    def _weight_files(self) -> list[str]:
        entries = sorted(os.listdir(self.directory))
        indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
        if len(indexes) > 1:
            raise ConvertError(
                f"{self.directory}: several shard indexes ({', '.join(indexes)}): this folder holds more than one "
                "variant of the weights; keep one (e.g. delete the *.fp16.* files) or point --from at a clean download"
            )
        if indexes:
            index_path = os.path.join(self.directory, indexes[0])
            index = read_json(index_path, "shard index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index_path}: no 'weight_map' (tensor name -> shard file); re-download the index file")
            self._index_files = [indexes[0]]
            self._expected = dict(weight_map)
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(self.directory, s))]
            if missing:
                raise ConvertError(
                    f"{index_path} lists {len(shards)} shard(s) but {len(missing)} are missing from {self.directory}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; finish the download "
                    "(huggingface-cli download resumes) and convert again"
                )
            return shards
        self._expected = None
        files = [e for e in entries if e.endswith(WEIGHTS_SUFFIX)]
        if not files:
            others = [e for e in entries if e.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (
                f" (found {', '.join(others[:3])}: pickled PyTorch weights are not read -- they can run code; "
                "download the safetensors release, or re-save with save_pretrained(safe_serialization=True))"
                if others
                else ""
            )
            raise ConvertError(f"{self.directory}: no *.safetensors weights{hint}")
        return files

    def _read_header(self, rel: str) -> None:
        from safetensors import safe_open

        path = os.path.join(self.directory, rel)
        try:
            with safe_open(path, framework="np") as f:
                names = list(f.keys())
                for name in names:
                    sl = f.get_slice(name)
                    code, shape = sl.get_dtype(), tuple(int(d) for d in sl.get_shape())
                    if name in self._entries:
                        raise ConvertError(
                            f"{path}: tensor {name!r} is also in {self._entries[name][0]}; the folder holds two variants of "
                            "the weights -- keep one (e.g. delete the *.fp16.* files)"
                        )
                    self._entries[name] = (rel, code, shape)
        except ConvertError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt files
            raise ConvertError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or corrupt -- "
                "delete it and download it again"
            ) from None
        if self._expected is not None:
            stray = [n for n in names if self._expected.get(n) != rel]
            if stray:
                raise ConvertError(
                    f"{path}: holds {stray[0]!r}, which the shard index maps to {self._expected.get(stray[0])!r}; "
                    "the index and the shards are from different downloads -- download them again together"
                )

    def _check_index_complete(self) -> None:
        if self._expected is None:
            return
        lost = [n for n in self._expected if n not in self._entries]
        if lost:
            raise ConvertError(
                f"{os.path.join(self.directory, self._index_files[0])}: {len(lost)} tensor(s) listed in the index are in no "
                f"shard (e.g. {lost[0]!r} in {self._expected[lost[0]]}); the shard is from another download -- download again"
            )

    # -- the interface family modules use ----------------------------------------------------------

    def names(self) -> list[str]:
        self._check_index_complete()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise ConvertError(
                f"{self.directory}: no tensor {name!r} in the checkpoint ({len(self._entries)} tensors; e.g. "
                f"{', '.join(sorted(self._entries)[:3])}); the checkpoint is not the model --family expects, or incomplete"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> np.dtype:
        rel, code, _ = self._entry(name)
        if code in FLOAT_DTYPES:
            return FLOAT_DTYPES[code]
        if code in INT_DTYPES:
            return INT_DTYPES[code]
        raise ConvertError(self._refusal(name, rel, code))

    def file(self, name: str) -> str:
        """The file (relative to the folder) holding ``name``."""
        return self._entry(name)[0]

    def files(self) -> list[str]:
        """Weight and index files, relative to the folder."""
        return sorted({e[0] for e in self._entries.values()} | set(self._index_files))

    def _refusal(self, name: str, rel: str, code: str) -> str:
        what = REFUSED_DTYPES.get(code, f"dtype {code}")
        return f"{os.path.join(self.directory, rel)}: tensor {name!r} is stored as {what}, which cannot be converted; {DOWNLOAD_HINT}"

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        """One tensor as a fresh numpy array: float32 for floating tensors; with ``raw=True`` the
        stored dtype (integer buffers). An integer/bool tensor without ``raw`` is an error (a weight
        was expected)."""
        rel, code, shape = self._entry(name)
        if code in REFUSED_DTYPES or (code not in FLOAT_DTYPES and code not in INT_DTYPES):
            raise ConvertError(self._refusal(name, rel, code))
        if code in INT_DTYPES and not raw:
            raise ConvertError(
                f"{os.path.join(self.directory, rel)}: tensor {name!r} is stored as {code} (integers) where a floating "
                f"weight is expected; the checkpoint is quantised or not the model --family expects -- {DOWNLOAD_HINT}"
            )
        from safetensors import safe_open

        path = os.path.join(self.directory, rel)
        try:
            with safe_open(path, framework="np") as f:  # mapped for this one read, unmapped on exit
                x = f.get_tensor(name)
                x = np.array(x, dtype=np.float32 if (code in FLOAT_DTYPES and not raw) else x.dtype, copy=True)
        except Exception as e:
            raise ConvertError(
                f"{path}: reading tensor {name!r} failed ({type(e).__name__}: {e}); the file is truncated or corrupt -- "
                "delete it and download it again"
            ) from None
        if x.shape != shape:
            raise ConvertError(f"{path}: tensor {name!r} has shape {x.shape}, its header says {shape}; re-download the file")
        self.used.add(name)
        return x


class DictSource:
    """A :class:`TensorSource` over an in-memory ``{name: array}`` (tests, generated checkpoints)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], directory: str = "<dict>"):
        self._tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.directory = directory
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _arr(self, name: str) -> np.ndarray:
        try:
            return self._tensors[name]
        except KeyError:
            raise ConvertError(f"{self.directory}: no tensor {name!r} in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arr(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self._arr(name).dtype

    def file(self, name: str) -> str:
        self._arr(name)
        return "<dict>"

    def files(self) -> list[str]:
        return []

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        x = self._arr(name)
        if raw:
            out = np.array(x, copy=True)
        elif np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
            out = np.array(x, dtype=np.float32, copy=True)
        else:
            raise ConvertError(f"{self.directory}: tensor {name!r} is {x.dtype} where a floating weight is expected")
        self.used.add(name)
        return out


def cast(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` in the output dtype (``"float32"``/``"bfloat16"`` or a numpy dtype); floating only."""
    return np.asarray(x, dtype=np_dtype(dtype))


def np_dtype(dtype) -> np.dtype:
    """``"float32"`` / ``"bfloat16"`` / a numpy dtype -> numpy dtype (bfloat16 from ml_dtypes)."""
    if isinstance(dtype, str):
        if dtype in ("bfloat16", "bf16"):
            return np.dtype(ml_dtypes.bfloat16)
        if dtype in ("float32", "f32", "fp32"):
            return np.dtype(np.float32)
        raise ConvertError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    return np.dtype(dtype)


def unused(src, ignore: Iterable[str] = ()) -> list[str]:
    """Source tensors never read by ``get``, minus those matching a pattern in ``ignore``
    (``fnmatch`` patterns, e.g. ``"text_model.*"``; an exact name is a pattern too)."""
    import fnmatch

    pats = list(ignore)
    return [n for n in src.names() if n not in src.used and not any(fnmatch.fnmatchcase(n, p) for p in pats)]
