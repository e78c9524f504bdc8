"""The embedded text path's tokenizer: UTF-8 bytes, no vocabulary file, nothing to download.

The trainable encoder that reads these tokens is part of the model
(:class:`mmdit.model.text_encoder.ByteTextEncoder`): it trains inside the jitted step, which codecs
never do.

**Tokenizer** (:class:`ByteTokenizer`): UTF-8 bytes shifted by 3; id 0 = PAD, 1 = BOS, 2 = EOS, so
``vocab_size = 259``. ``encode(text, max_len)`` -> int32 ``[max_len]`` = ``BOS, bytes..., EOS, PAD...``
(text longer than ``max_len - 2`` bytes is cut at a character boundary and keeps its EOS).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET


class ByteTokenizer:
    """UTF-8 byte tokenizer with PAD=0, BOS=1, EOS=2 (see the module docstring)."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """``text`` -> int32 ``[max_len]``: BOS, UTF-8 bytes + 3, EOS, then PAD (0)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; decode bytes with .decode('utf-8') first")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for BOS and EOS; use max_len >= 2")
        data = text.encode("utf-8")
        if len(data) > max_len - 2:  # cut, dropping a multi-byte character the cut would split
            data = data[: max_len - 2].decode("utf-8", errors="ignore").encode("utf-8")
        out = np.zeros(max_len, np.int32)
        out[0] = BOS
        out[1 : 1 + len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + OFFSET
        out[1 + len(data)] = EOS
        return out

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """A list of strings -> int32 ``[B, max_len]``."""
        return np.stack([self.encode(t, max_len) for t in texts]) if texts else np.zeros((0, max_len), np.int32)

    def decode(self, tokens) -> str:
        """int ``[L]`` -> text: the bytes between BOS and the first EOS (PAD and specials skipped)."""
        ids = np.asarray(tokens).ravel().tolist()
        data = bytearray()
        for i in ids:
            if i == EOS:
                break
            if i >= OFFSET:
                data.append(i - OFFSET)
        return data.decode("utf-8", errors="replace")
