"""mmdit.codecs.stft.HannSTFT: librosa's hann STFT / ISTFT (center=True, zero padding) to float32 rounding."""

import librosa
import numpy as np
import pytest

from mmdit.codecs.stft import HannSTFT


@pytest.mark.parametrize("n_fft, hop", [(1024, 640), (512, 128), (64, 64)])
def test_hann_stft_matches_librosa(n_fft, hop):
    kw = dict(n_fft=n_fft, hop_length=hop, win_length=n_fft, center=True)
    stft = HannSTFT(n_fft, hop)
    wave = np.random.RandomState(0).randn(2, 7 * hop + 17).astype(np.float32)
    want = librosa.stft(wave, pad_mode="constant", **kw)
    got = stft.stft(wave)
    assert got.shape == want.shape and got.dtype == np.complex64
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
    # lengths shorter than, equal to and beyond what the frames cover (librosa zero-fills the tail)
    for length in (hop * (want.shape[-1] - 1), wave.shape[-1], hop * (want.shape[-1] + 3), n_fft + 3):
        ref = librosa.istft(want, length=length, **kw)
        np.testing.assert_allclose(stft.istft(want, length), ref, atol=2e-6)
        projected = librosa.stft(ref, pad_mode="constant", **kw)
        np.testing.assert_allclose(stft.project(want, length), projected, atol=1e-6 * np.abs(projected).max())


def test_hann_stft_round_trip_and_bad_sizes():
    stft = HannSTFT(256, 64)
    wave = np.random.RandomState(1).randn(3, 1000).astype(np.float32)
    np.testing.assert_allclose(stft.istft(stft.stft(wave), 1000), wave, atol=1e-5)
    for n_fft, hop in ((255, 64), (256, 0), (256, 300)):
        with pytest.raises(ValueError, match="n_fft"):
            HannSTFT(n_fft, hop)
