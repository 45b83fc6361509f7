"""DICOM films for preprocess.load_film: decode, apply the grey-scale pipeline of the standard, scale to 0..255.

    is_dicom(src)              by content ("DICM" at byte 128), else by the ".dcm" extension
    read_dicom(src, name)      -> "L" (8-bit result) or "F" (float 0..255) PIL image, or DataError

What comes out is what preprocess.read_image gives for a PNG or JPEG, so the same resize, intensity and
JPEG code follows (preprocess.load_film), and a DICOM film and its PNG export give the same tensor.

The steps (DICOM PS3.3 C.11 and C.7.6.3.1.2):
1. decode the one frame, signed or unsigned, any Bits Stored in its container: pydicom itself
   (uncompressed, RLE), its Pillow plugin (JPEG baseline, first), GDCM (JPEG baseline, extended,
   lossless; JPEG-LS; JPEG 2000; 12-bit lossy JPEG through GDCM's own reader, see _decode) and
   pylibjpeg-openjpeg (JPEG 2000, HTJ2K);
2. Modality LUT: the Modality LUT Sequence, or Rescale Slope / Intercept (`apply_modality_lut`);
3. VOI: the VOI LUT Sequence, else the first Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID;
   `apply_voi_lut`), whose output range (pydicom's: the range of the modality output) is mapped to
   0..255. A VOI LUT's output range is 0..2^n - 1 for its n bits per entry, narrowed like a PNG's
   (below) when its entries stay below half of it (LUTs declared 16-bit that hold 12-bit values);
4. without a VOI LUT or window, the window is the range Bits Stored allows (0..2^b - 1, signed:
   -2^(b-1)..2^(b-1) - 1; through the rescale), narrowed as preprocess._scale_high_depth narrows a
   16-bit PNG: to the smallest detector depth of 8, 10, 12, 14, 16 bits that holds the film's values
   (never more than Bits Stored). An unsigned film without rescale so gives exactly the float image
   of its 16-bit PNG export; fixed ranges (never a per-image min/max) keep films comparable;
5. MONOCHROME1 (minimum = white) is inverted after the VOI, so bone is always bright.

The result stays in float ("F") until preprocess rounds it once, after the resize and intensity
steps, like a 16-bit PNG: a 12-bit film windowed to a 400-level lung range keeps its precision. An
8-bit film is returned as "L" instead, the 8-bit path of its PNG, so that both give the same bytes
even after a resize (PIL resizes "L" in integers with a rounding per pass, "F" in float: otherwise up
to 1 grey level apart before the JPEG step, and up to ~7 after it): 8-bit data without a window,
and 8-bit pixels scaled into a deeper container without a window (round(p * (2^b - 1) / 255), as
imports of PNG/JPEG films into a PACS write them), recognised by every value lying within half a
stored level of a whole grey level, which a real 10-16-bit film never does.

Refused with a DataError naming the file and the reason: no pixel data, several frames, colour
(RGB, YBR_*, PALETTE COLOR: CR and DX films are MONOCHROME1/2 by the standard; a colour DICOM is a
secondary capture, e.g. a screenshot or an annotated export, whose windowing and marks are burned
in, not a film to train on), a truncated or undecodable file, a transfer syntax without a decoder.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

# The bit depths detectors store (and DICOM -> PNG exports keep) inside a 16-bit container; a
# 16-bit PNG is narrowed to them too (preprocess.py imports them from here: this module is the
# lower one, so that the two do not import each other).
BIT_DEPTHS = (8, 10, 12, 14, 16)

DICM_OFFSET = 128
DICM_MAGIC = b"DICM"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Raster formats PIL reads: a file with one of these signatures is not a DICOM whatever its name.
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")

_BYTES = (bytes, bytearray, memoryview)


def _head(src: str | Path | bytes) -> bytes:
    if isinstance(src, _BYTES):
        return bytes(src[: DICM_OFFSET + 4])
    try:
        with open(src, "rb") as f:
            return f.read(DICM_OFFSET + 4)
    except OSError:
        return b""  # missing or unreadable: the PIL path reports it


def has_preamble(head: bytes) -> bool:
    return head[DICM_OFFSET : DICM_OFFSET + 4] == DICM_MAGIC


def is_dicom(src: str | Path | bytes) -> bool:
    """Whether `src` is read as DICOM: "DICM" at byte 128 (a Part 10 file, whatever its name), or a
    ".dcm" name whose content is not a PNG/JPEG/WebP/GIF/TIFF (a dataset written without the preamble)."""
    head = _head(src)
    if has_preamble(head):
        return True
    if isinstance(src, _BYTES) or not head:
        return False
    if head.startswith(_RASTER_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return False
    return os.path.splitext(str(src))[1].lower() == ".dcm"


def _depth(top: float, cap: float) -> float:
    """2^b - 1 for the smallest b in BIT_DEPTHS with top <= 2^b - 1 and 2^b - 1 < cap; else cap."""
    for b in BIT_DEPTHS:
        full = 2.0**b - 1
        if full >= cap:
            break
        if top <= full:
            return full
    return float(cap)


def _lut_top(ds, sequence: str) -> float:
    """The output top of the first LUT of `sequence` ("VOILUTSequence", "ModalityLUTSequence"):
    2^n - 1 for its n bits per entry, narrowed to the detector depth (BIT_DEPTHS) its entries fit
    in when they stay below half of that (a LUT declared 16-bit that holds 12-bit values)."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi

    item = ds[sequence][0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    inputs = np.arange(first, first + (entries or 2**16))  # every entry, decoded by pydicom (US/OW)
    table = apply_voi(inputs, ds) if sequence == "VOILUTSequence" else apply_modality_lut(inputs, ds)
    return _depth(float(np.max(table)), 2.0**bits - 1)


def _range_without_voi(ds, stored: np.ndarray) -> tuple[float, float, float]:
    """(black, white, modality units per stored level) when the file has no VOI LUT and no window."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, _lut_top(ds, "ModalityLUTSequence"), 1.0
    bits = int(ds.BitsStored)
    low = -(2.0 ** (bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 1 else 0.0
    full = _depth(float(stored.max()) - low if stored.size else 0.0, 2.0**bits - 1)
    slope, intercept = 1.0, 0.0
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # as apply_modality_lut applies them
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    ends = sorted((low * slope + intercept, (low + full) * slope + intercept))
    return ends[0], ends[1], abs(slope)


def _range_of_voi(ds, window: bool) -> tuple[float, float]:
    """(black, white): the output range of the VOI LUT or window pydicom applied."""
    from pydicom.pixels.processing import apply_windowing

    if not window:  # VOI LUT Sequence: 0..2^n - 1 (narrowed, see _lut_top)
        return 0.0, _lut_top(ds, "VOILUTSequence")
    # The window maps everything below it to pydicom's y_min and above it to y_max: probe them.
    with np.errstate(over="ignore"):
        low, high = apply_windowing(np.array([-1e300, 1e300]), ds)
    return float(low), float(high)


def _truncation(ds, warned: list[str], preamble: bool) -> str:
    """Why `ds`, as pydicom read it, is a cut-off (or, without the preamble, not a DICOM) file; ""
    when it looks whole.

    pydicom does not fail on a truncated file: it gives a shorter last value (a native Pixel Data
    of fewer bytes than declared), warns and drops everything when the end comes inside an
    encapsulated (compressed) value, or reads nothing when it comes inside the file meta. Without
    the preamble (read with force) any bytes parse as some elements, usually a short last one.
    """
    what = "truncated file" if preamble else "not a DICOM file (no \"DICM\" at byte 128), or a truncated one"
    eof = [w for w in warned if "end of file" in w.lower()]
    if eof:
        return f"{what} ({eof[0]})"
    tags = [t for t in ds.keys() if t.group > 0x0002]
    if not tags:
        return f"{what}: no data set{' after the file meta information' if preamble else ''}"
    last = ds.get_item(tags[-1])  # still raw here: value as read, length as declared
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
        return (f"{what} (element {last.tag} holds {len(value)} of its {length} bytes"
                f"{'; the pixel data is cut off' if last.tag == 0x7FE00010 else ''})")
    return ""


def _set_transfer_syntax(ds) -> None:
    """A data set without file meta information (no preamble: an old or raw export) has no
    Transfer Syntax UID, which pydicom needs to decode: the encoding it was read in is it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _decode(ds, syntax, src: str | Path | bytes) -> np.ndarray:
    """The one frame as an integer array (pydicom sign-extends Bits Stored < Bits Allocated).

    JPEG baseline goes to Pillow's decoder first: the libjpeg-turbo that reads .jpg files in
    preprocess.read_image, so a DICOM that wraps a JPEG gives that JPEG's pixels exactly (GDCM's decoder
    may round its IDCT differently); the other decoders when Pillow fails. 12-bit JPEG Extended,
    which pydicom's installed plugins refuse (Pillow, GDCM's plugin), goes to GDCM's own reader.
    """
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if syntax == JPEGExtended12Bit and int(ds.BitsStored) > 8:
            try:
                return _decode_with_gdcm(ds, src)
            except Exception as e:
                try:
                    return ds.pixel_array  # a plugin installed later (e.g. pylibjpeg-libjpeg) may
                except Exception as plugins:
                    raise RuntimeError(f"GDCM: {e}; pydicom: {plugins}") from plugins
        if syntax == JPEGBaseline8Bit:
            try:
                ds.pixel_array_options(decoding_plugin="pillow")
                return ds.pixel_array
            except Exception:
                ds.pixel_array_options(decoding_plugin="")
        return ds.pixel_array


@contextlib.contextmanager
def _quiet_stderr():
    """GDCM's JPEG codecs print to the C stderr (file descriptor 2) each precision they try before
    the one that fits, whatever gdcm.Trace says: hide that for the duration of a read."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decode_with_gdcm(ds, src: str | Path | bytes) -> np.ndarray:
    """Decode the file with GDCM's C++ reader (python-gdcm), which handles 12-bit lossy JPEG."""
    import tempfile

    import gdcm

    gdcm.Trace.WarningOff()  # it reports each codec it tries, even when one succeeds
    gdcm.Trace.ErrorOff()
    with tempfile.TemporaryDirectory() as tmp, _quiet_stderr():
        if isinstance(src, _BYTES):  # the reader takes a file name only
            path = os.path.join(tmp, "film.dcm")
            with open(path, "wb") as f:
                f.write(bytes(src))
        else:
            path = str(src)
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise ValueError("GDCM cannot read the file")
        image = reader.GetImage()
        buffer = image.GetBuffer()
    fmt = image.GetPixelFormat()
    allocated, bits, signed = fmt.GetBitsAllocated(), int(ds.BitsStored), fmt.GetPixelRepresentation() == 1
    if allocated not in (8, 16) or fmt.GetSamplesPerPixel() != 1:
        raise ValueError(f"GDCM gave {fmt.GetSamplesPerPixel()} sample(s) of {allocated} bits")
    if isinstance(buffer, str):  # SWIG hands the bytes over as a str
        buffer = buffer.encode("utf-8", "surrogateescape")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    arr = np.frombuffer(buffer, dtype=dtype)
    if arr.size != int(ds.Rows) * int(ds.Columns):
        raise ValueError(f"GDCM gave {arr.size} pixels for {ds.Rows} x {ds.Columns}")
    arr = arr.reshape(int(ds.Rows), int(ds.Columns)).astype(np.int32)
    if bits < allocated:  # only Bits Stored count: mask the others, sign-extend a signed film
        arr &= (1 << bits) - 1
        if signed:
            arr = np.where(arr >= 1 << (bits - 1), arr - (1 << bits), arr)
    return arr


def _fail(name: str, what: str) -> DataError:
    return DataError(f"cannot read DICOM {name}: {what}")


def read_dicom(src: str | Path | bytes, name: str) -> Image.Image:
    """A one-frame grey-scale DICOM -> "L" or "F" (float 0..255) PIL image; DataError if unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
    from pydicom.uid import UID

    raw = bytes(src) if isinstance(src, _BYTES) else None
    preamble = has_preamble(_head(src))
    try:
        with warnings.catch_warnings(record=True) as caught:
            # pydicom warns and goes on: on odd but readable files (ignored), and on an end of file
            # inside an encapsulated value (a truncated file: see _truncation)
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(raw) if raw is not None else src, force=not preamble)
    except FileNotFoundError as e:
        raise DataError(f"no such image: {name}") from e
    except InvalidDicomError as e:
        raise _fail(name, f"not a DICOM file ({e})") from e
    except Exception as e:  # truncated headers end in EOFError, OSError, ValueError, struct.error...
        raise _fail(name, f"truncated or corrupt file ({type(e).__name__}: {e})") from e
    problem = _truncation(ds, [str(w.message) for w in caught], preamble)
    if problem:
        raise _fail(name, problem)
    _set_transfer_syntax(ds)

    if "PixelData" not in ds:
        kind = ds.get("SOPClassUID")
        kind = f" ({UID(kind).name})" if kind else ""
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"float pixel data ({other[0]}), not a radiograph" if other else "no pixel data (7FE0,0010)"
        raise _fail(name, f"{what}; it is not an image{kind}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        samples = int(ds.get("SamplesPerPixel", 1))
        int(ds.BitsStored), int(ds.BitsAllocated), int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise _fail(name, f"incomplete image attributes ({type(e).__name__}: {e})") from e
    if frames != 1:
        raise _fail(name, f"{frames} frames; one film per file is expected (split the multi-frame file)")
    if photometric not in MONOCHROME or samples != 1:
        raise _fail(name, f"photometric interpretation {photometric} with {samples} sample(s) per pixel: "
                          f"only grey-scale films (MONOCHROME1, MONOCHROME2) are read; a colour DICOM is a "
                          f"secondary capture (screenshot, annotated or scanned image), not a radiograph")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        stored = _decode(ds, syntax, src)
    except Exception as e:  # truncated pixel data, a codec error, or no decoder for the syntax
        syntax_name = f"transfer syntax {UID(syntax).name}" if syntax else "no transfer syntax"
        raise _fail(name, f"pixel data not decodable ({syntax_name}; {type(e).__name__}: {e})") from e
    if stored.ndim != 2:
        raise _fail(name, f"pixel array of shape {stored.shape}; one grey-scale frame is expected")

    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = apply_modality_lut(stored, ds)
            if has_lut or has_window:
                if has_lut and values.dtype.kind == "f" and np.array_equal(values, np.rint(values)):
                    values = values.astype(np.int64)  # a LUT is indexed by integers
                values = apply_voi_lut(values, ds)
                # (black, white) may be (high, low): a negative rescale slope reverses the range
                black, white = _range_of_voi(ds, window=not has_lut)
                step = 0.0
            else:
                black, white, unit = _range_without_voi(ds, stored)
                step = 255.0 * unit / (white - black) if white > black else 0.0  # a stored level, in grey levels
    except Exception as e:  # a malformed LUT, a zero or negative window width...
        raise _fail(name, f"invalid grey-scale transform ({type(e).__name__}: {e})") from e
    if white == black:
        raise _fail(name, f"empty output range {black}..{white}")

    # float32 arithmetic as preprocess._scale_high_depth does it, so a film equals its 16-bit PNG.
    arr = values.astype(np.float32)
    scale = np.float32(255.0 / (white - black))
    if photometric == "MONOCHROME1":
        arr = (np.float32(white) - arr) * scale  # minimum = white: inverted, bone bright
    else:
        arr = (arr - np.float32(black)) * scale
    arr = np.clip(arr, 0.0, 255.0)
    # An 8-bit film: 8-bit data, or 8-bit pixels scaled into a deeper container (round(p * 4095 /
    # 255): every value within half a stored level of a whole grey level, which a real 10-16-bit
    # film never is) -> "L", the 8-bit path of its PNG, so both give the same bytes even after a
    # resize (PIL resizes "L" in integers, "F" in float: up to 1 grey level apart).
    whole = np.rint(arr)
    tol = (0.5 * step if step < 0.5 else 0.0) + 1e-3  # + float32 slack
    if float(np.max(np.abs(arr - whole), initial=0.0)) <= tol:
        return Image.fromarray(whole.astype(np.uint8))
    return Image.fromarray(arr)
