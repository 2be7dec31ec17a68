"""Caption-folder layouts, buckets, corrupt images, missing captions."""

import csv
import json

import pytest
import torch
from sd35_helpers import make_caption_folder, write_image

from soar_fast.config import ConfigError
from soar_fast.data.images import (
    CaptionError,
    CaptionImageDataset,
    ImageFolderConfig,
    make_buckets,
    nearest_bucket,
    resize_center_crop,
    scan_image_folder,
)


def test_sidecar_layout(tmp_path):
    root = make_caption_folder(tmp_path / "a", n=3)
    (root / "sub").mkdir()
    write_image(root / "sub" / "deep.jpg", seed=7)
    (root / "sub" / "deep.txt").write_text("  nested caption \n")
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16))
    assert [r.caption for r in res.records] == ["a red square", "a green field", "a blue sky", "nested caption"]
    assert all(r.bucket == (16, 16) for r in res.records) and res.skipped == []


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_metadata_layouts(tmp_path, layout):
    root = tmp_path / layout
    root.mkdir()
    rows = []
    for i in range(3):
        write_image(root / f"x{i}.png", seed=i)
        rows.append({"file_name": f"x{i}.png", "text": f"caption {i}", "extra": i})
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with (root / "metadata.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16))
    assert [r.caption for r in res.records] == ["caption 0", "caption 1", "caption 2"]


def test_metadata_named_columns_and_errors(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    write_image(root / "y.png")
    meta = tmp_path / "captions.jsonl"
    meta.write_text(json.dumps({"image": "y.png", "caption": "named"}) + "\n")
    res = scan_image_folder(ImageFolderConfig(root=str(root), metadata=str(meta), resolution=16))
    assert res.records[0].caption == "named"
    with pytest.raises(CaptionError, match="no column 'prompt'"):
        scan_image_folder(ImageFolderConfig(root=str(root), metadata=str(meta), caption_column="prompt"))
    meta.write_text(json.dumps({"image": "y.png", "label": "x"}) + "\n")
    with pytest.raises(CaptionError, match="no caption column"):
        scan_image_folder(ImageFolderConfig(root=str(root), metadata=str(meta)))


def test_missing_caption_and_allow_empty(tmp_path):
    root = make_caption_folder(tmp_path / "c", n=2)
    (root / "img00.txt").write_text("   ")
    with pytest.raises(CaptionError, match="img00.png: missing caption"):
        scan_image_folder(ImageFolderConfig(root=str(root), resolution=16))
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16, allow_empty_captions=True))
    assert [r.caption for r in res.records] == ["", "a green field"]


def test_corrupt_images_skipped_with_reasons(tmp_path):
    root = make_caption_folder(tmp_path / "d", n=2)
    (root / "bad.jpg").write_bytes(b"definitely not a jpeg")
    (root / "bad.txt").write_text("bad")
    write_image(root / "trunc.png", seed=5)
    (root / "trunc.png").write_bytes((root / "trunc.png").read_bytes()[:200])
    (root / "trunc.txt").write_text("truncated")
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16))
    assert len(res.records) == 3  # headers only: the truncated file is caught when caching
    assert [s.path.endswith("bad.jpg") for s in res.skipped] == [True] and res.skipped[0].reason
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16, verify_decode=True))
    assert len(res.records) == 2 and sorted(s.path.rsplit("/", 1)[-1] for s in res.skipped) == ["bad.jpg", "trunc.png"]


def test_buckets():
    b = make_buckets(512, 64, 2.0)
    assert (512, 512) in b and all(h % 64 == 0 and w % 64 == 0 for h, w in b)
    assert all(h * w <= 512 * 512 and max(h, w) / min(h, w) <= 2.0 for h, w in b)
    assert all(h * w >= 0.8 * 512 * 512 for h, w in b)
    widest = max(b, key=lambda hw: hw[1] / hw[0])
    assert nearest_bucket(1024, 512, b) == widest and nearest_bucket(4000, 100, b) == widest
    assert nearest_bucket(300, 300, b) == (512, 512)
    portrait = nearest_bucket(600, 800, b)
    assert portrait[0] > portrait[1]


def test_resize_center_crop_and_dataset(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red left strip is cropped away by a center crop
    out = resize_center_crop(img, (16, 16))
    assert out.size == (16, 16) and out.getpixel((0, 8))[0] < 128
    assert resize_center_crop(img, (16, 16), center=False).getpixel((0, 8))[0] > 128

    sizes = [(32, 32), (48, 24), (32, 32), (48, 24), (24, 48)]
    root = make_caption_folder(tmp_path / "e", n=5, sizes=sizes)
    res = scan_image_folder(ImageFolderConfig(root=str(root), resolution=16, aspect_buckets=True, bucket_step=4))
    assert len({r.bucket for r in res.records}) == 3
    ds = CaptionImageDataset(res.records)
    for i, r in enumerate(res.records):  # each image at its record's bucket size
        x = ds[i]["pixel_values"]
        assert tuple(x.shape) == (3, *r.bucket)
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_config_checks():
    with pytest.raises(ConfigError, match="resolution"):
        ImageFolderConfig(root=".", resolution=4)
