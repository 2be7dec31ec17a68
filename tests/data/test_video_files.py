"""Video files as Wan clips (soar_fast.data.video): .mp4 through PyAV, animated .gif through PIL and
frame folders read alike, every `frame_stride`-th frame from the first; captions beside a file
(`clip.mp4` -> `clip.txt`); short clips skipped with the reason; no PyAV is one line naming the fix."""

import sys

import numpy as np
import pytest
from PIL import Image

from soar_fast.config import ConfigError
from soar_fast.data.images import ImageFolderConfig, ImageRecord
from soar_fast.data.video import clip_frames, frame_count, load_clip, scan_clip_folder

SIZE = (48, 40)  # (width, height)


def _frames(n: int) -> list[Image.Image]:
    """Frame k is a flat gray of level 20 k + 10: which frame a decoder returned is readable from its mean."""
    return [Image.fromarray(np.full((SIZE[1], SIZE[0], 3), 20 * k + 10, np.uint8)) for k in range(n)]


def write_mp4(path, n: int, fps: int = 16):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = *SIZE, "yuv420p"
        for im in _frames(n):
            c.mux(s.encode(av.VideoFrame.from_image(im)))
        c.mux(s.encode())
    return path


def write_gif(path, n: int):
    f = _frames(n)
    f[0].save(path, save_all=True, append_images=f[1:], duration=62, loop=0)
    return path


def write_frame_folder(path, n: int):
    path.mkdir()
    for k, im in enumerate(_frames(n)):
        im.save(path / f"{k:03d}.png")
    return path


def _levels(frames: list[Image.Image]) -> list[int]:
    return [round((float(np.asarray(f).mean()) - 10) / 20) for f in frames]


@pytest.mark.parametrize("kind", ["mp4", "gif", "folder"])
def test_each_clip_kind_gives_the_strided_frames(tmp_path, kind):
    write = {"mp4": write_mp4, "gif": write_gif, "folder": write_frame_folder}[kind]
    clip = write(tmp_path / (f"c.{kind}" if kind != "folder" else "c"), 9)
    assert frame_count(clip) == 9
    frames = clip_frames(clip, 3, stride=2)
    assert [f.size for f in frames] == [SIZE] * 3 and _levels(frames) == [0, 2, 4]
    assert _levels(clip_frames(clip, 5)) == [0, 1, 2, 3, 4]
    assert len(clip_frames(clip, 5, stride=3)) == 3  # frames 0, 3, 6: the clip ends before 9 and 12
    px = load_clip(ImageRecord(str(clip), "", SIZE, (32, 32)), 5, frame_stride=2)
    assert px.shape == (3, 5, 32, 32) and -1 <= px.min() and px.max() <= 1


def test_a_folder_of_video_files_scans_with_captions_beside_them(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    write_mp4(root / "a.mp4", 9)
    write_gif(root / "b.gif", 9)
    write_frame_folder(root / "c", 9)
    write_mp4(root / "short.mp4", 6)
    for name in ("a", "b", "c", "short"):
        (root / f"{name}.txt").write_text(f"clip {name}", encoding="utf-8")
    scan = scan_clip_folder(ImageFolderConfig(root=str(root), resolution=32), 5, frame_stride=2)
    assert [r.caption for r in scan.records] == ["clip a", "clip b", "clip c"]
    assert [r.size for r in scan.records] == [SIZE] * 3
    (skip,) = scan.skipped
    assert skip.path.endswith("short.mp4") and "6 frame(s), fewer than --num_frames 5 at --frame_stride 2 (9)" in skip.reason
    (root / "a.txt").unlink()
    with pytest.raises(ValueError, match=r"a.mp4: missing caption \(no a.txt beside it\)"):
        scan_clip_folder(ImageFolderConfig(root=str(root), resolution=32), 5)


def test_a_video_file_without_pyav_is_one_line(tmp_path, monkeypatch):
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"not decoded")
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ConfigError, match=r"needs PyAV: pip install av .* or give the clip as a folder of frame images"):
        frame_count(clip)
