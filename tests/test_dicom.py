"""DICOM input (cxr_dist/data/dicom.py through preprocess.load_film), on real DICOM files written here by
pydicom: Digital X-Ray / CR SOP classes, Explicit VR Little Endian, RLE Lossless and JPEG 2000
Lossless (encoded here), JPEG baseline (an IU JPEG wrapped as it is), and the reference files pydicom
ships (JPEG-LS lossless, JPEG 2000, RLE and JPEG extended, written by other toolkits); made from
real IU X-ray films where the shared copy is present, else from generated films."""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from cxr_dist.data.dicom import is_dicom, read_dicom
from cxr_dist.errors import DataError
from cxr_dist.data.preprocess import encode_film, load_film
from tests.conftest import TINY, VENV_BIN, run_cmd

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small/images"
REFERENCE = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped in pydicom's wheel
DX = uid.DigitalXRayImageStorageForPresentation
CR = uid.ComputedRadiographyImageStorage
EXPLICIT, RLE, J2K = uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless
# (image_size, resize, intensity): the same film through resizes and both intensity mappings
SETTINGS = [(256, "letterbox", "none"), (224, "letterbox", "none"), (200, "squash", "percentile"),
            (64, "letterbox", "equalize")]


# ----------------------------------------------------------------------------- films and files


def films(n: int = 2) -> list[tuple[str, np.ndarray]]:
    """n real IU X-ray films (8-bit, 256 x 256) spread over the shared copy; generated ones without it."""
    if not SHARED_IMAGES.is_dir():
        return [(f"generated{seed}", chest(256, 210, seed)) for seed in range(n)]
    out = []
    for p in sorted(SHARED_IMAGES.glob("*.jpg"))[:: 6000 // n][:n]:
        with Image.open(p) as im:
            out.append((p.name, np.asarray(im.convert("L"))))
    return out


def a_jpeg(tmp: Path) -> Path:
    """A real IU JPEG as it is; a generated one without the shared copy."""
    if SHARED_IMAGES.is_dir():
        return sorted(SHARED_IMAGES.glob("*.jpg"))[0]
    path = tmp / "generated.jpg"
    Image.fromarray(chest(256, 256)).save(path, quality=90)
    return path


def chest(h: int = 160, w: int = 128, seed: int = 0) -> np.ndarray:
    """A generated film-like 8-bit image: bright body, darker lungs, noise, a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 60 + 120 * (y / h) + 30 * np.sin(x / 9.0)
    for cx in (w * 0.3, w * 0.7):
        img -= 50 * (((x - cx) / (w * 0.15)) ** 2 + ((y - h * 0.45) / (h * 0.3)) ** 2 < 1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def deep_film(bits: int, h: int = 150, w: int = 120, seed: int = 1) -> np.ndarray:
    """A real high-depth film: every stored level may occur (not 8-bit pixels scaled), 0..2^bits-1."""
    rng = np.random.default_rng(seed)
    base = chest(h, w, seed).astype(np.float64) * ((2**bits - 1) / 255.0)
    arr = np.clip(np.rint(base + rng.normal(0, 2**bits / 300, base.shape)), 0, 2**bits - 1)
    arr[0, 0], arr[-1, -1] = 0, 2**bits - 1  # the detector's whole range
    return arr.astype(np.uint16)


def to12(p8: np.ndarray) -> np.ndarray:
    """8-bit pixels scaled to 12 bits, as a PNG -> DICOM import writes them."""
    return np.rint(p8 * (4095 / 255)).astype(np.uint16)


def stored(p8: np.ndarray, depth: str) -> tuple[np.ndarray, int]:
    """(pixel array, Bits Stored) of an 8-bit film in one of the containers DICOM allows."""
    if depth == "8":
        return p8.copy(), 8
    if depth == "12":
        return to12(p8), 12
    if depth == "12 signed":
        return (to12(p8).astype(np.int16) - 2048), 12  # -2048..2047, sign-extended in 16 bits
    if depth == "16":
        return p8.astype(np.uint16) * 257, 16
    if depth == "16 signed":
        return (p8.astype(np.int32) * 257 - 32768).astype(np.int16), 16
    raise ValueError(depth)


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                syntax: str = EXPLICIT, sop: str = DX, **attrs) -> Path:
    """A Part 10 file (preamble, file meta, SOP class) of `arr` with `syntax`, as a modality writes it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = EXPLICIT
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR" if sop == CR else "DX"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "test", uid.generate_uid(), uid.generate_uid()
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if syntax != EXPLICIT:
        ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


# Lossless syntaxes GDCM's own writer encodes (pydicom's encoders: RLE and JPEG 2000 only). Its
# 12-bit lossy JPEG is no use as a test file: it writes precision 16 in the frame header, which
# lossy JPEG does not allow (pydicom's JPGExtended.dcm is the 12-bit lossy file used instead).
GDCM_SYNTAXES = {uid.JPEGLosslessSV1: "JPEGLosslessProcess14_1", uid.JPEGLSLossless: "JPEGLSLossless"}


def transcode_with_gdcm(src: Path, dst: Path, syntax: str) -> Path:
    """`src` re-encoded by GDCM (python-gdcm, a dependency: it decodes the JPEG family) in `syntax`."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, GDCM_SYNTAXES[syntax])))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write()
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == syntax
    return dst


def write_any(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
              syntax: str = EXPLICIT, **kw) -> Path:
    """write_dicom, through GDCM for the syntaxes pydicom does not encode."""
    if syntax not in GDCM_SYNTAXES:
        return write_dicom(path, arr, photometric, bits, syntax, **kw)
    plain = write_dicom(path.with_suffix(".plain"), arr, photometric, bits, **kw)
    return transcode_with_gdcm(plain, path, syntax)


def wrap_jpeg(path: Path, jpeg: bytes, rows: int, cols: int) -> Path:
    """A CR file whose Pixel Data is `jpeg` as it is (JPEG Baseline transfer syntax)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR, uid.generate_uid()
    meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path, format="PNG")
    return path


def px(im: Image.Image) -> np.ndarray:
    assert im.mode == "L"
    return np.asarray(im, dtype=np.float64)


def same_everywhere(a: Path, b: Path) -> None:
    for size, resize, intensity in SETTINGS:
        assert encode_film(a, size, resize, intensity) == encode_film(b, size, resize, intensity), \
            (a.name, b.name, size, resize, intensity)


# ----------------------------------------------------------------------------- DICOM == its PNG


LOSSLESS = [EXPLICIT, RLE, J2K, uid.JPEGLosslessSV1, uid.JPEGLSLossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=["explicit", "rle", "j2k", "jpeg-lossless", "jpeg-ls"])
@pytest.mark.parametrize("depth", ["8", "12", "12 signed", "16", "16 signed"])
def test_dicom_gives_the_same_bytes_as_its_png(tmp_path, depth, syntax):
    """A MONOCHROME2 film without a window whose pixels are a PNG's, in 8 bits or scaled to 12 or 16
    bits (signed or not), lossless in any syntax: encode_film gives the PNG's bytes, resized or not,
    with either intensity mapping. Exact, not within 1 grey level: such a film is recognised as 8-bit
    (every value within half a stored level of a whole grey level) and takes the 8-bit path."""
    for name, p8 in films():
        arr, bits = stored(p8, depth)
        dcm = write_any(tmp_path / f"{name}.dcm", arr, bits=bits, syntax=syntax)
        assert pydicom.dcmread(dcm).file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(pydicom.dcmread(dcm).pixel_array, arr)  # lossless, sign kept
        same_everywhere(dcm, png(tmp_path / f"{name}.png", p8))


def test_a_real_high_depth_film_stays_in_float_and_equals_its_16_bit_png(tmp_path):
    """A 12- or 16-bit film (every level may occur) is kept in float through resize and intensity,
    exactly as its 16-bit PNG export is: the same bytes; an 8-bit film scaled to 12 bits is "L".
    ("equalize" after a downsizing resize: LANCZOS overshoots below 0 in float, which crashed
    preprocess._equalize for 16-bit PNGs too until it clipped.)"""
    for bits in (12, 16):
        arr = deep_film(bits)
        dcm = write_dicom(tmp_path / f"d{bits}.dcm", arr, bits=bits, syntax=RLE)
        assert read_dicom(dcm, "d").mode == "F"
        same_everywhere(dcm, png(tmp_path / f"d{bits}.png", arr))
    eight = write_dicom(tmp_path / "e.dcm", to12(chest()), bits=12)
    assert read_dicom(eight, "e").mode == "L"
    assert np.array_equal(np.asarray(read_dicom(eight, "e")), chest())


def test_jpeg_baseline_dicom_equals_the_jpeg_it_wraps(tmp_path):
    """An IU JPEG wrapped as it is in a CR file (JPEG Baseline): decoded by the same libjpeg as the
    .jpg path (Pillow's plugin first), so the same bytes. (A JPEG >= 2 x image_size is decoded at
    reduced scale on the .jpg path only; these 256 px films are not.)"""
    jpg = a_jpeg(tmp_path)
    dcm = wrap_jpeg(tmp_path / "j.dcm", jpg.read_bytes(), 256, 256)
    assert pydicom.dcmread(dcm).file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    for size, resize, intensity in SETTINGS[:3]:
        assert encode_film(dcm, size, resize, intensity) == encode_film(jpg, size, resize, intensity)


def test_reference_files_of_other_toolkits_decode_alike(capfd):
    """pydicom's reference files: the same 16-bit signed MR image uncompressed and as RLE, JPEG 2000
    and JPEG-LS lossless (written by other toolkits), with its window 600/1600; and 12-bit lossy JPEG
    Extended, which pydicom's installed plugins refuse and GDCM's reader decodes: the values
    pydicom's own tests expect, through bytes too, the file meant to be bad (JPEG-lossy.dcm) alike,
    and nothing printed on stderr by GDCM's codecs."""
    from cxr_dist.data.dicom import _decode

    ref = REFERENCE / "MR_small.dcm"
    if not ref.is_file():
        pytest.skip(f"pydicom's reference files not found in {REFERENCE}")
    want = encode_film(ref, 64)
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert encode_film(REFERENCE / name, 64) == want, name
    capfd.readouterr()
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):  # 1024 x 256 NM, 12 bits in JPEG process 4
        ds = pydicom.dcmread(REFERENCE / name)
        assert ds.file_meta.TransferSyntaxUID == uid.JPEGExtended12Bit and ds.BitsStored == 12
        arr = _decode(ds, uid.JPEGExtended12Bit, REFERENCE / name)
        assert arr.shape == (1024, 256) and arr[420, 140] == 244 and arr[230, 120] == 95, name
        film = load_film(REFERENCE / name, 128)
        assert film.size == (32, 128) and film.tobytes() == load_film((REFERENCE / name).read_bytes(), 128).tobytes()
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------- MONOCHROME1


@pytest.mark.parametrize("bits", [12, 16])
def test_monochrome1_of_inverted_pixels_equals_monochrome2(tmp_path, bits):
    """MONOCHROME1 (minimum = white) of the inverted pixels gives the MONOCHROME2 film's bytes: real
    films (8-bit content) and a real high-depth film (float path), resized, both intensities."""
    arrays = [to12(p8) if bits == 12 else p8.astype(np.uint16) * 257 for _, p8 in films()]
    arrays.append(deep_film(bits))
    top = 2**bits - 1
    for i, arr in enumerate(arrays):
        mono2 = write_dicom(tmp_path / f"m2_{i}.dcm", arr, "MONOCHROME2", bits)
        mono1 = write_dicom(tmp_path / f"m1_{i}.dcm", (top - arr).astype(np.uint16), "MONOCHROME1", bits,
                            syntax=RLE, sop=CR)
        same_everywhere(mono1, mono2)
        # and bone is bright: the MONOCHROME1 film is not shown as its raw (inverted) values
        assert px(load_film(mono1, 64)).mean() == pytest.approx(px(load_film(mono2, 64)).mean())


# ----------------------------------------------------------------------------- VOI: window, LUT


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) -> 0..255."""
    return 255 * np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def _linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 (LINEAR_EXACT) -> 0..255."""
    return 255 * np.clip((x - c) / w + 0.5, 0, 1)


def _sigmoid(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 (SIGMOID) -> 0..255."""
    return 255 / (1 + np.exp(-4 * (x - c) / w))


RAMP12 = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit level once


@pytest.mark.parametrize("case", ["linear", "linear_exact", "sigmoid", "rescale", "signed12", "unsigned16",
                                  "signed16", "two_windows", "monochrome1"])
def test_window_center_width_clips_and_scales_as_the_standard_says(tmp_path, case):
    """Every stored level through a window: below it black, above it white, in between the
    standard's function of the (rescaled) value; load_film gives that, rounded once."""
    arr, bits, attrs, x = RAMP12, 12, {}, RAMP12.astype(np.float64)
    func, c, w, photometric = _linear, 2048.0, 1024.0, "MONOCHROME2"
    if case == "linear_exact":
        func, c, w, attrs = _linear_exact, 1000.0, 300.0, {"VOILUTFunction": "LINEAR_EXACT"}
    elif case == "sigmoid":
        func, c, w, attrs = _sigmoid, 2500.0, 800.0, {"VOILUTFunction": "SIGMOID"}
    elif case == "rescale":  # the window is in modality units: value = 2 * stored - 1024
        attrs = {"RescaleSlope": 2, "RescaleIntercept": -1024, "RescaleType": "US"}
        x, c, w = 2.0 * x - 1024, 3000.0, 2000.0
    elif case == "signed12":
        arr = (RAMP12.astype(np.int16) - 2048)
        x, c, w = arr.astype(np.float64), -100.0, 900.0
    elif case == "unsigned16":
        arr = RAMP12 * 16
        bits, x, c, w = 16, arr.astype(np.float64), 30000.0, 20000.0
    elif case == "signed16":
        arr = (RAMP12.astype(np.int32) * 16 - 32768).astype(np.int16)
        bits, x, c, w = 16, arr.astype(np.float64), -5000.0, 20000.0
    elif case == "two_windows":  # several windows: the first is the default view
        attrs = {"WindowCenter": [c, 100.0], "WindowWidth": [w, 50.0]}
    elif case == "monochrome1":
        photometric = "MONOCHROME1"
    attrs = {"WindowCenter": c, "WindowWidth": w, **attrs}
    dcm = write_dicom(tmp_path / f"{case}.dcm", arr, photometric, bits, **attrs)
    want = func(x, c, w)
    if photometric == "MONOCHROME1":
        want = 255 - want
    got = px(load_film(dcm, 64))  # 64 x 64: no resize
    assert np.abs(got - want).max() <= 0.5 + 1e-3, case  # the exact value, rounded
    assert (got[want == 0] == 0).all() and (got[want == 255] == 255).all()
    assert (want == 0).any() and (want == 255).any() or case == "sigmoid"  # the window does clip


def _voi_lut(entries: np.ndarray, first: int, bits: int, ow: bool) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), first, bits])  # LUT Descriptor
    data = entries.astype("<u2").tobytes() if ow else [int(v) for v in entries]
    item.add_new(0x00283006, "OW" if ow else "US", data)  # LUT Data
    return item


@pytest.mark.parametrize("case", ["lut16", "lut16_holding_12_bits", "lut_with_offset", "lut_over_window"])
def test_voi_lut_sequence(tmp_path, case):
    """A VOI LUT maps each stored level; its output 0..2^n - 1 (n bits per entry) is 0..255; a LUT
    declared 16-bit whose entries stay 12-bit is read as 12-bit (as a 16-bit PNG holding 12 bits);
    levels below the first mapped one take the first entry, above the last the last one; a LUT wins
    over a window."""
    levels = np.arange(4096)
    attrs: dict = {}
    if case == "lut16_holding_12_bits":
        entries, first, top = np.rint(4095 * (levels / 4095) ** 2), 0, 4095
    elif case == "lut_with_offset":  # maps 1024..3071 only
        entries, first, top = np.rint(65535 * (np.arange(2048) / 2047) ** 0.7), 1024, 65535
    else:
        entries, first, top = np.rint(65535 * (levels / 4095) ** 0.5), 0, 65535
        if case == "lut_over_window":
            attrs = {"WindowCenter": 100, "WindowWidth": 10}
    lut = _voi_lut(entries, first, 16, ow=case != "lut16")
    dcm = write_dicom(tmp_path / f"{case}.dcm", RAMP12, bits=12, VOILUTSequence=[lut], **attrs)
    index = np.clip(RAMP12.astype(np.int64) - first, 0, len(entries) - 1)
    want = entries[index] * (255 / top)
    assert np.abs(px(load_film(dcm, 64)) - want).max() <= 0.5 + 1e-3


def test_12_bit_stored_in_16_with_garbage_high_bits_and_no_window(tmp_path):
    """Bits Stored 12 in 16 allocated, no window: the range is the 12 bits (not 16), so a 12-bit film
    is not 1/16 bright; a signed one is sign-extended from bit 11."""
    arr = deep_film(12)
    got = px(load_film(write_dicom(tmp_path / "u.dcm", arr, bits=12), 150))
    assert got.max() == 255 and got.min() == 0
    signed = write_dicom(tmp_path / "s.dcm", (arr.astype(np.int16) - 2048), bits=12)
    assert np.array_equal(px(load_film(signed, 150)), got)


# ----------------------------------------------------------------------------- detection


def test_detected_by_content_and_by_extension(tmp_path):
    """"DICM" at byte 128 whatever the name (or bytes); a .dcm name without the preamble (a raw data
    set, implicit VR); a PNG named .dcm is still a PNG."""
    film = chest()
    dcm = write_dicom(tmp_path / "f.dcm", to12(film))
    want = encode_film(png(tmp_path / "f.png", film), 128)
    for name in ("f.bin", "f", "f.png"):
        other = tmp_path / "named" / name
        other.parent.mkdir(exist_ok=True)
        other.write_bytes(dcm.read_bytes())
        assert is_dicom(other) and encode_film(other, 128) == want, name
    assert is_dicom(dcm.read_bytes()) and encode_film(dcm.read_bytes(), 128) == want
    raw = pydicom.dcmread(dcm)
    del raw.file_meta
    raw.preamble = None
    pydicom.dcmwrite(tmp_path / "raw.dcm", raw, implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw.dcm").read_bytes()[128:132] != b"DICM"
    assert is_dicom(tmp_path / "raw.dcm") and encode_film(tmp_path / "raw.dcm", 128) == want
    misnamed = png(tmp_path / "png.dcm", film)
    assert not is_dicom(misnamed) and encode_film(misnamed, 128) == want
    assert not is_dicom(tmp_path / "f.png") and not is_dicom(tmp_path / "missing.dcm")


# ----------------------------------------------------------------------------- errors


def _no_pixels(path: Path, sop: str = DX) -> Path:
    write_dicom(path, to12(chest()))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop
    ds.save_as(path, enforce_file_format=True)
    return path


def _cut(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def _no_decoder(path: Path) -> Path:
    """Encapsulated pixel data in a syntax no installed plugin decodes (MPEG2)."""
    write_dicom(path, chest(), bits=8, syntax=RLE)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.save_as(path, enforce_file_format=True)
    return path


def _error_cases(tmp: Path) -> list[tuple[Path, str]]:
    film = chest()
    rgb = np.stack([film, film, film], axis=-1)
    whole = write_dicom(tmp / "whole.dcm", to12(film))
    rle = write_dicom(tmp / "whole_rle.dcm", to12(film), syntax=RLE)
    size = whole.stat().st_size
    return [
        (_no_pixels(tmp / "nopixels.dcm"), r"no pixel data \(7FE0,0010\); it is not an image \(Digital X-Ray"),
        (_no_pixels(tmp / "report.dcm", uid.BasicTextSRStorage), r"no pixel data .*Basic Text SR"),
        (write_dicom(tmp / "rgb.dcm", rgb, "RGB", 8), r"photometric interpretation RGB with 3 sample.*MONOCHROME1"),
        (write_dicom(tmp / "ybr.dcm", rgb, "YBR_FULL", 8, syntax=RLE), r"photometric interpretation YBR_FULL"),
        (write_dicom(tmp / "palette.dcm", film, "PALETTE COLOR", 8), r"photometric interpretation PALETTE COLOR"),
        (write_dicom(tmp / "frames.dcm", np.stack([to12(film)] * 2), bits=12), r"2 frames; one film per file"),
        (_cut(whole, tmp / "cut_pixels.dcm", size - 1000),
         r"truncated file \(element \(7FE0,0010\) holds .* the pixel data is cut off"),
        (_cut(whole, tmp / "cut_header.dcm", 400), r"truncated file"),
        (_cut(whole, tmp / "cut_meta.dcm", 140), r"truncated file: no data set after the file meta"),
        (_cut(rle, tmp / "cut_rle.dcm", rle.stat().st_size // 2), r"truncated file \(End of file"),
        (_no_decoder(tmp / "mpeg2.dcm"), r"pixel data not decodable \(transfer syntax MPEG2"),
        (write_dicom(tmp / "width0.dcm", to12(film), WindowCenter=100, WindowWidth=0), r"invalid grey-scale transform"),
        (_text(tmp / "notes.dcm"), r"not a DICOM file \(no \"DICM\" at byte 128\)"),
        (tmp / "missing.dcm", r"no such image"),
    ]


def _text(path: Path) -> Path:
    path.write_text("patient list, not an image\n" * 3)
    return path


def test_every_bad_dicom_is_a_data_error_naming_the_file_and_the_reason(tmp_path):
    for path, reason in _error_cases(tmp_path):
        with pytest.raises(DataError) as caught:
            load_film(path, 64)
        assert str(path) in str(caught.value) and re.search(reason, str(caught.value)), (reason, caught.value)


# ----------------------------------------------------------------------------- end to end


def _samples(out: Path) -> dict[str, tuple[bytes, bytes]]:
    """key -> (jpg, cls) over every shard of a prepared folder."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = t.extractfile(m).read()
    return {k: (v["jpg"], v["cls"]) for k, v in found.items()}


def test_prepare_a_csv_of_dicom_files_gives_the_shards_of_their_pngs(tmp_path):
    """`cxr-dist prepare` (the real CLI) on a csv source of .dcm files (12/16-bit, signed, MONOCHROME1,
    RLE and JPEG 2000) writes the same shard images as on the PNGs; a multi-frame file is a
    corrupt_image skip with the reason."""
    from cxr_dist import cli

    p8s = [p8 for _, p8 in films(8)]
    kinds = [("12", EXPLICIT, "MONOCHROME2"), ("16", RLE, "MONOCHROME1"), ("12 signed", J2K, "MONOCHROME2"),
             ("8", EXPLICIT, "MONOCHROME1")]
    rows_dcm, rows_png = [], []
    for i, p8 in enumerate(p8s):
        depth, syntax, photometric = kinds[i % len(kinds)]
        arr, bits = stored(p8, depth)
        if photometric == "MONOCHROME1":  # unsigned here: inverted pixels
            arr = (2**bits - 1 - arr.astype(np.int64)).astype(arr.dtype)
        write_dicom(tmp_path / f"film{i}.dcm", arr, photometric, bits, syntax=syntax, sop=(DX, CR)[i % 2])
        png(tmp_path / f"film{i}.png", p8)
        row = {"label": ("normal", "abnormal")[i % 2], "patient": f"p{i}", "view": "PA"}
        rows_dcm.append({"path": f"film{i}.dcm", **row})
        rows_png.append({"path": f"film{i}.png", **row})
    write_dicom(tmp_path / "multi.dcm", np.stack([to12(p8s[0])] * 3), bits=12)
    rows_dcm.append({"path": "multi.dcm", "label": "normal", "patient": "p0", "view": "PA"})

    def prepare(name: str, rows: list[dict], subprocess: bool) -> Path:
        table = tmp_path / f"{name}.csv"
        table.write_text("path,label,patient,view\n" + "".join(
            f"{r['path']},{r['label']},{r['patient']},{r['view']}\n" for r in rows))
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[[data.sources]]\nname = "h"\nformat = "csv"\npath = "{table}"\n\n'
                          "[data]\nimage_size = 96\ninput_size = 64\nsamples_per_shard = 4\nmax_skip_frac = 0.2\n"
                          "prepare_workers = 1\n")
        out = tmp_path / f"out_{name}"
        args = ["prepare", "--config", str(config), "--out", str(out)]
        if subprocess:
            res = run_cmd([str(VENV_BIN / "cxr-dist"), *args], cwd=tmp_path)
            assert res.returncode == 0, res.stdout + res.stderr
        else:  # the reference route in this process (a second subprocess costs ~4 s on a busy CPU)
            assert cli.main(args) == 0
        return out

    out_dcm, out_png = prepare("dcm", rows_dcm, subprocess=True), prepare("png", rows_png, subprocess=False)
    got, want = _samples(out_dcm), _samples(out_png)
    assert len(want) == 8 and got == want
    splits = lambda out: {k: v["total"] for k, v in json.loads((out / "index.json").read_text())["splits"].items()}
    assert splits(out_dcm) == splits(out_png)
    skipped = [json.loads(line) for line in (out_dcm / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in skipped] == ["corrupt_image"]
    assert re.search(r"multi\.dcm.*3 frames; one film per file", skipped[0]["detail"])


def test_predict_reads_a_dicom_as_its_png(tmp_path, capsys):
    """`cxr-dist predict` (cli.main, the console script's function, in this process: a subprocess
    would import torch again, ~9 s) on a MONOCHROME1 RLE .dcm and its PNG gives the same probability;
    a bad .dcm ends it with the reason and exit code 2. The checkpoint is a real one
    (checkpoint.save_checkpoint of the tiny config's model, random weights): a training run would add
    a minute and test nothing more about reading DICOM."""
    from cxr_dist import cli
    from cxr_dist.product import predict
    from cxr_dist.model.checkpoint import save_checkpoint
    from cxr_dist.config import load_config, to_dict
    from cxr_dist.model.classifier import build_model

    cfg = load_config(str(TINY), [])
    run = tmp_path / "run"
    save_checkpoint(run, "best", build_model(cfg.model).state_dict(), {}, {"config": to_dict(cfg)})
    film = films(1)[0][1]
    dcm = write_dicom(tmp_path / "film.dcm", (4095 - to12(film)).astype(np.uint16), "MONOCHROME1", 12, syntax=RLE)
    flat = png(tmp_path / "film.png", film)
    assert np.array_equal(np.asarray(predict.load_image(dcm, cfg.data, cfg.loader)), np.asarray(predict.load_image(flat, cfg.data, cfg.loader)))
    assert cli.main(["predict", "--checkpoint", str(run), "--json", str(dcm), str(flat)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(dcm), str(flat)]
    assert rows[0]["prob_abnormal"] == rows[1]["prob_abnormal"]
    bad = write_dicom(tmp_path / "frames.dcm", np.stack([to12(film)] * 2), bits=12)
    assert cli.main(["predict", "--checkpoint", str(run), str(bad)]) == 2
    assert f"cxr-dist predict: {bad}: cannot read DICOM: 2 frames" in capsys.readouterr().err
