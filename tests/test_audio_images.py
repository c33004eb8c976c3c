"""Audio decode / silence / crops and image decode / resize / tensors / grids, on real files."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avpgan.audio import AudioError, crop_or_tile, from_int16, read_audio, remove_silence, to_int16
from avpgan.images import (ImageError, load_rgb, make_grid, read_image, resize, save_png, to_tensor, to_uint8,
                           with_title)

SR = 16000


def tone(seconds: float, freq: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- audio


def test_wav_16k_round_trips_exactly_through_int16(tmp_path):
    pcm = np.random.default_rng(0).integers(-20000, 20000, SR, dtype=np.int16)
    sf.write(tmp_path / "a.wav", pcm, SR, subtype="PCM_16")
    y = read_audio(tmp_path / "a.wav", SR)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(to_int16(y), pcm)
    np.testing.assert_array_equal(to_int16(from_int16(pcm)), pcm)


def test_stereo_48k_flac_becomes_mono_16k(tmp_path):
    left, right = tone(1.0, 440, 48000, 0.6), tone(1.0, 440, 48000, 0.2)
    sf.write(tmp_path / "s.flac", np.stack([left, right], 1), 48000, format="FLAC")
    y = read_audio(tmp_path / "s.flac", SR)
    assert y.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * SR / len(y) - 440) < 2  # the tone survived resampling
    assert abs(np.abs(y[1000:-1000]).max() - 0.4) < 0.01  # mean of 0.6 and 0.2


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"RIFF" + bytes(range(200)), "unreadable audio"), (np.random.default_rng(1).bytes(3000), "unreadable audio")],
)
def test_bad_audio_raises_naming_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(AudioError) as e:
        read_audio(p, SR)
    assert str(p) in str(e.value) and e.value.reason == reason and "\n" not in str(e.value)


def test_wav_truncated_mid_data_is_detected(tmp_path):
    sf.write(tmp_path / "a.wav", tone(2.0, 200), SR, subtype="PCM_16")
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "a.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError) as e:
        read_audio(tmp_path / "a.wav", SR)
    assert e.value.reason == "truncated audio"


def test_remove_silence_keeps_the_voiced_stretch():
    y = np.concatenate([np.zeros(SR), tone(1.5, 300), np.zeros(SR)])
    v = remove_silence(y, top_db=30)
    assert 1.5 * SR <= v.size <= 1.5 * SR + 2 * 2048  # librosa's frames add at most a frame each side
    assert remove_silence(np.zeros(SR, np.float32), 30).size == 0
    assert remove_silence(np.full(SR, 1e-6, np.float32), 30).size == 0  # rounds to int16 zero


def test_to_int16_clips():
    np.testing.assert_array_equal(to_int16(np.array([1.5, -2.0, 0.5, -1.0])), [32767, -32768, 16384, -32768])


def test_crop_or_tile():
    a = np.arange(100, dtype=np.int16)
    c1 = crop_or_tile(a, 30, np.random.default_rng(0))
    assert c1.shape == (30,) and np.all(np.diff(c1) == 1)  # a contiguous window
    starts = {int(crop_or_tile(a, 30, np.random.default_rng(s))[0]) for s in range(20)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 70
    np.testing.assert_array_equal(c1, crop_or_tile(a, 30, np.random.default_rng(0)))
    t = crop_or_tile(a[:40], 100, np.random.default_rng(0))
    np.testing.assert_array_equal(t, np.concatenate([a[:40], a[:40], a[:20]]))  # repeated end to end
    np.testing.assert_array_equal(crop_or_tile(a, 100, np.random.default_rng(0)), a)
    with pytest.raises(ValueError):
        crop_or_tile(a[:0], 10, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- images


def pattern(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full((h, w), 90)], -1).astype(np.uint8)


def test_modes_convert_to_rgb(tmp_path):
    rgb = pattern(20, 30)
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.png")
    g, mode = load_rgb(tmp_path / "g.png")
    assert mode == "L" and g.shape == (20, 30, 3) and np.all(g[..., 0] == g[..., 2])
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], -1)
    rgba[:, :10, 3] = 0  # transparent left third -> black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a, mode = load_rgb(tmp_path / "a.png")
    assert mode == "RGBA" and np.all(a[:, :10] == 0) and np.array_equal(a[:, 10:], rgb[:, 10:])
    Image.fromarray(rgb).quantize(8).save(tmp_path / "p.png")
    p, mode = load_rgb(tmp_path / "p.png")
    assert mode == "P" and p.shape == (20, 30, 3) and np.abs(p.astype(int) - rgb).mean() < 40
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    c, mode = load_rgb(tmp_path / "c.jpg")
    assert mode == "CMYK" and np.abs(c.astype(int) - rgb).mean() < 10
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(tmp_path / "i16.png")
    i16, _ = load_rgb(tmp_path / "i16.png")
    assert i16.max() > 200 and i16.min() == 0  # 16-bit scaled down, not saturated


def test_unreadable_images_raise_naming_the_file(tmp_path):
    (tmp_path / "r.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    Image.fromarray(pattern(64, 64)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    for name in ("r.jpg", "t.jpg", "missing.png"):
        with pytest.raises(ImageError) as e:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_resize_center_crops_to_square():
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # red borders left and right, outside the central 60x60
    img[:, 80:] = (255, 0, 0)
    img[:, 20:80] = (0, 200, 0)
    out = resize(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[..., 0].max() < 10 and out[..., 1].min() > 190
    np.testing.assert_array_equal(resize(pattern(64, 64), 64), pattern(64, 64))


def test_tensor_round_trip():
    img = pattern(16, 12)
    t = to_tensor(img)
    assert t.shape == (3, 16, 12) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    assert t[0, 0, 0] == -1.0 and t[0, 0, -1] == 1.0
    np.testing.assert_array_equal(to_uint8(t), img)
    batch = np.stack([img, img[::-1]])
    np.testing.assert_array_equal(to_uint8(to_tensor(batch)), batch)
    assert to_uint8(torch.full((3, 2, 2), 3.0)).max() == 255


def test_make_grid_and_save_png(tmp_path):
    a = to_tensor(np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)]))
    b = to_tensor(np.stack([np.full((8, 8, 3), v, np.uint8) for v in (40, 50, 60)])).numpy()
    grid = make_grid([a, b], nrow=3)
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3) and grid.dtype == np.uint8
    assert grid[2, 2, 0] == 10 and grid[2 + 10, 2 + 2 * 10, 0] == 60 and grid[0, 0, 0] == 0
    assert make_grid(a, nrow=2).shape == (22, 22, 3)
    with pytest.raises(ValueError):
        make_grid([a, to_tensor(np.zeros((1, 4, 4, 3), np.uint8))], nrow=3)
    # Rows named in a left margin, cells scaled up (nearest) to at least `min_cell` px, a title on top
    labelled = make_grid([a, b], nrow=3, row_labels=["real", "generated"], min_cell=32)
    margin = labelled.shape[1] - (2 + 3 * 34)
    assert labelled.shape[0] == 2 + 2 * 34 and margin > 0
    np.testing.assert_array_equal(labelled[2 : 2 + 32, margin + 2 : margin + 2 + 32], np.full((32, 32, 3), 10, np.uint8))
    for r in (0, 1):  # white text in each row's margin, black between the rows' labels
        assert labelled[2 + r * 34 : 2 + r * 34 + 32, :margin].max() == 255
    assert make_grid([a, b], nrow=3, row_labels=["real", "a much longer label"]).shape[1] > \
        make_grid([a, b], nrow=3, row_labels=["real", "fake"]).shape[1]
    with pytest.raises(ValueError, match="2 batches"):
        make_grid([a, b], nrow=3, row_labels=["real"])
    short = make_grid([a, b[:2]], nrow=3)  # a shorter batch still starts a row of its own
    assert short.shape == (22, 32, 3) and short[2 + 10, 2, 0] == 40 and short[2 + 10, 2 + 2 * 10, 0] == 0
    titled = with_title(labelled, "gan samples, step 100")
    assert titled.shape[1] == labelled.shape[1] and titled.shape[0] > labelled.shape[0]
    np.testing.assert_array_equal(titled[titled.shape[0] - labelled.shape[0]:], labelled)
    assert titled[: titled.shape[0] - labelled.shape[0]].max() == 255
    save_png(grid, tmp_path / "g" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g" / "grid.png")), grid)
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["grid.png"]
