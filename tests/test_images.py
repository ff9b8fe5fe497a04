import base64
import io
import os
import time

import numpy as np
import pytest
from conftest import jpeg_bytes, rgb_at, write_tsv
from PIL import Image

from competition import ImageTSV, MugeDataError, SkippedImages, decode_image, iter_tsv, resize_image
from competition.images import decode_image_pil
from infra.gallery import decode_into


def test_index_reads_by_id_and_matches_iteration(tmp_path):
    rows = [(100 + i, jpeg_bytes((i * 20, 100, 50))) for i in range(10)]
    path = write_tsv(tmp_path / "g.tsv", rows)
    tsv = ImageTSV(path)
    assert len(tsv) == 10 and tsv.index_path == path + ".idx.npz" and os.path.exists(tsv.index_path)
    for rec in iter_tsv(path):
        assert tsv.read_payload(rec.img_id) == rec.payload
        assert tsv.line_of(rec.img_id) == rec.line
    assert tsv.position(99) == -1 and tsv.position(2**70) == -1 and 99 not in tsv and 105 in tsv
    assert tsv.contains_all([100, 99, 109]).tolist() == [True, False, True]
    assert tsv.read_bytes(105) == rows[5][1]
    assert 105 in tsv and 999 not in tsv
    with pytest.raises(MugeDataError, match="image 999 is not in this gallery"):
        tsv.read_bytes(999)


def test_index_is_cached_and_rebuilt_on_change(tmp_path):
    path = write_tsv(tmp_path / "g.tsv", [(1, jpeg_bytes()), (2, jpeg_bytes())])
    ImageTSV(path)
    stamp = os.stat(path + ".idx.npz").st_mtime_ns
    ImageTSV(path)  # reuses the cache
    assert os.stat(path + ".idx.npz").st_mtime_ns == stamp
    time.sleep(0.01)
    with open(path, "a") as f:
        f.write(f"3\t{base64.b64encode(jpeg_bytes()).decode()}\n")
    tsv = ImageTSV(path)
    assert len(tsv) == 3 and tsv.read_bytes(3) == jpeg_bytes()


def test_cache_dir_used_when_index_file_unwritable(tmp_path, monkeypatch):
    """A read-only data dir (or any unwritable index file) falls back to the cache dir.
    Forced even for root: a directory squats the index file's name."""
    path = write_tsv(tmp_path / "g.tsv", [(1, jpeg_bytes())])
    (tmp_path / "g.tsv.idx.npz").mkdir()  # a directory squats the index file's name
    tsv = ImageTSV(path, cache_dir=str(tmp_path / "cache"))
    assert tsv.index_path.startswith(str(tmp_path / "cache")) and tsv.read_bytes(1) == jpeg_bytes()


def test_urlsafe_and_standard_base64_and_bom(tmp_path):
    data = bytes(range(256)) * 3  # has '+' '/' in standard and '-' '_' in urlsafe form
    for urlsafe in (False, True):
        path = write_tsv(tmp_path / f"g{urlsafe}.tsv", [(7, data)], urlsafe=urlsafe)
        assert ImageTSV(path).read_bytes(7) == data
    unpadded = base64.b64encode(data[:10]).decode().rstrip("=")
    path = write_tsv(tmp_path / "np.tsv", [(8, unpadded)])
    assert ImageTSV(path).read_bytes(8) == data[:10]
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf9\t" + base64.b64encode(data) + b"\r\n")
    assert ImageTSV(str(bom)).read_bytes(9) == data


@pytest.mark.parametrize("content, message, line", [
    ("1\tAAAA\n1\tAAAA\n", "duplicate image id 1 (first on line 1)", 2),
    ("1\tAAAA\n2 AAAA\n", "no tab", 2),
    ("1\tAAAA\nabc\tAAAA\n", "image id b'abc' is not a decimal integer", 2),
    ("1\tAAAA\n1_2_3\tAAAA\n", "image id b'1_2_3' is not a decimal integer", 2),  # int() would say 123
    ("1\tAAAA\n9223372036854775808\tAAAA\n", "does not fit in a signed 64-bit integer", 2),
    ("1\tAAAA\n\n2\tAAAA\n", "blank line", 2),
])
def test_bad_tsv_lines(tmp_path, content, message, line):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(MugeDataError) as err:
        ImageTSV(str(p))
    assert message in str(err.value) and f"bad.tsv:{line}:" in str(err.value)


def test_empty_tsv(tmp_path):
    p = tmp_path / "e.tsv"
    p.write_text("")
    with pytest.raises(MugeDataError, match="empty file"):
        ImageTSV(str(p))


def test_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(MugeDataError("g.tsv", "image 3: bad", 7)))
    assert str(err) == "g.tsv:7: image 3: bad" and err.line == 7


def test_bad_image_payloads_name_id_and_line(tmp_path):
    good = jpeg_bytes(size=(64, 64))
    rows = [(1, good), (2, "not*base64!"), (3, b"this is plain text, not an image"), (4, good[: len(good) // 2])]
    path = write_tsv(tmp_path / "g.tsv", rows)
    tsv = ImageTSV(path)
    assert tsv.load(1).size == (64, 64)
    with pytest.raises(MugeDataError, match=r"g.tsv:2: image 2: invalid base64"):
        tsv.load(2)
    with pytest.raises(MugeDataError, match=r"g.tsv:3: image 3: bytes are not an image"):
        tsv.load(3)
    with pytest.raises(MugeDataError, match=r"g.tsv:4: image 4: truncated or corrupt"):
        tsv.load(4)
    out = np.zeros((4, 32, 32, 3), np.uint8)
    kept, bad = decode_into(tsv, 0, 4, out, 32, "squash", skip_bad=True)  # the decoder train and predict share
    assert kept.tolist() == [0] and [(i, line) for i, line, _ in bad] == [(2, 2), (3, 3), (4, 4)]
    assert out[0].any() and not out[1:].any()  # the kept image first; the rows left over are zeroed
    skipped = SkippedImages(bad)
    assert skipped.summary().startswith("skipped 3 undecodable image(s): 2, 3, 4")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_decode_modes_to_rgb():
    gray = decode_image(jpeg_bytes(128, mode="L"))
    assert gray.mode == "RGB" and abs(rgb_at(gray)[0] - 128) <= 2
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    out = decode_image(_png(rgba))
    assert rgb_at(out, (0, 0)) == (255, 255, 255) and rgb_at(out, (1, 1)) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert rgb_at(decode_image(_png(la))) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    assert rgb_at(decode_image(_png(pal))) == (255, 255, 255)
    cmyk = decode_image(jpeg_bytes((0, 255, 255, 0), mode="CMYK"))
    r, g, b = rgb_at(cmyk)
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert rgb_at(decode_image(_png(sixteen))) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_sample_gallery_decodes(small_sample):
    tsv = ImageTSV(str(small_sample / "MR_valid_imgs.tsv"))
    modes = set()
    for img_id in tsv.ids.tolist():
        img = tsv.load(img_id)
        modes.add(Image.open(io.BytesIO(tsv.read_bytes(img_id))).format)
        assert img.mode == "RGB" and img.size == (224, 224)
    assert "JPEG" in modes


def test_fast_jpeg_path_gives_pils_pixels(small_sample):
    """`decode_image` decodes plain JPEGs through simplejpeg: the pixels must be PIL's own, for every
    image of the sample (odd modes and formats included) and the edge cases, so that training and
    predict (which share the function) see exactly what PIL would have given."""
    from competition.images import _decode_plain_jpeg, decode_image_pil

    fast = 0
    for split in ("train", "valid", "test"):
        tsv = ImageTSV(str(small_sample / f"MR_{split}_imgs.tsv"))
        for img_id in tsv.ids.tolist():
            data = tsv.read_bytes(img_id)
            fast += _decode_plain_jpeg(data) is not None
            assert np.array_equal(np.asarray(decode_image(data)), np.asarray(decode_image_pil(data))), img_id
    assert fast > 0.9 * sum(len(ImageTSV(str(small_sample / f"MR_{s}_imgs.tsv"))) for s in ("train", "valid", "test"))
    gray, cmyk = jpeg_bytes(128, mode="L"), jpeg_bytes((0, 255, 255, 0), mode="CMYK")
    assert np.array_equal(np.asarray(decode_image(gray)), np.asarray(decode_image_pil(gray)))
    assert _decode_plain_jpeg(cmyk) is None  # PIL's CMYK conversion, not libjpeg-turbo's
    img, exif = Image.new("RGB", (40, 20), (0, 0, 255)), Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert _decode_plain_jpeg(buf.getvalue()) is None  # EXIF: PIL rotates it
    truncated = tsv.read_bytes(tsv.ids[0])[:-200]
    assert _decode_plain_jpeg(truncated) is None  # a complaint: PIL raises the named error
    with pytest.raises(MugeDataError, match="truncated or corrupt"):
        decode_image(truncated)


def test_pixels_straight_from_the_decoder_are_the_resized_images(small_sample):
    """`decode_pixels` (predict's and training evaluation's path) gives `resize_image(decode_image())`
    exactly, whether the JPEG is already the target size (decoded straight into the given buffer,
    no PIL image) or not (resized), for every image of the sample and both resize rules."""
    from competition.images import decode_pixels

    straight = 0
    for split in ("valid", "test"):
        tsv = ImageTSV(str(small_sample / f"MR_{split}_imgs.tsv"))
        for img_id in tsv.ids.tolist():
            data = tsv.read_bytes(img_id)
            for size, rule in ((224, "squash"), (64, "squash"), (96, "shorter-crop")):
                expected = resize_image(decode_image_pil(data), size, rule)
                out = np.full((2, size, size, 3), 7, np.uint8)
                got = decode_pixels(data, size, rule, out=out[1])
                assert np.array_equal(out[1], expected) and np.array_equal(got, expected), (img_id, size, rule)
                assert (out[0] == 7).all()  # only the row given was written
                straight += size == 224 and np.shares_memory(got, out)
            assert np.array_equal(tsv.load_pixels(img_id, 224, "squash"), resize_image(tsv.load(img_id), 224))
    assert straight > 0.9 * 2 * len(tsv)  # the sample's JPEGs are 224 x 224: most skip PIL entirely
