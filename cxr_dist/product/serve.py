"""The servable MLflow model: encoded film bytes in, calibrated probability, label and OOD score out.

Every run logs one (train/end_of_run.py) as the artifact `model` of its MLflow run, and registers it as a
version of `tracking.registered_model`, moving the alias `tracking.model_alias` to it when its
validation metric beats the alias's current version (tracking.MLflowTracker.register). Serve it:

    mlflow models serve -m "models:/cxr-dist@best" --env-manager local --host 127.0.0.1 --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d "{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 chest.png)\\"}]}"
    -> {"predictions": [{"prob_abnormal": 0.31, "prob_uncalibrated": 0.27, "label": "normal",
                         "ood_score": 41.2, "ood_flag": false}]}

What the model holds, and why nothing is pickled:
- `artifacts/checkpoint/`: the run's best checkpoint, as it is on disk: safetensors weights, the
  meta.json with the config, temperature, threshold and OOD threshold, extra.safetensors with the
  OOD statistics. Loaded with checkpoint.py (no unpickling).
- `code/cxr_dist/`: this package's source (code_paths), so the served model reads films exactly as
  `cxr-dist predict` does (inference.py, preprocess.py) without cxr-dist installed.
- The model itself is "models from code": MLflow runs a three-line file that builds `CXRPyfunc()`,
  instead of unpickling a Python object.

Input: a column `image` of base64-encoded files (PNG, JPEG, DICOM: whatever `predict` reads), one
row per film; line-wrapped base64 (the `base64` tool's default) is accepted. A row that is null, not
base64, not an image, or a constant image fails the whole request with one message that names every
bad row by its index, one line each ("row 2: ...", "row 5: ..."): the scoring server answers HTTP
400, never a silent probability.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from ..config import LoaderConfig, section
from ..errors import UserError

INPUT_SCHEMA = Schema([ColSpec("string", "image")])
OUTPUT_SCHEMA = Schema([ColSpec("double", "prob_abnormal"), ColSpec("double", "prob_uncalibrated"),
                        ColSpec("string", "label", required=False), ColSpec("double", "ood_score", required=False),
                        ColSpec("boolean", "ood_flag", required=False), ColSpec("boolean", "text", required=False),
                        ColSpec("boolean", "text_truncated", required=False)])


def output_schema(findings: tuple[str, ...] = ()) -> Schema:
    """The answer's columns: OUTPUT_SCHEMA, and for a model with a findings head one
    `prob_<finding>` per finding (calibrated) and `findings_positive` (the findings at or above
    their validation thresholds, comma-separated)."""
    if not findings:
        return OUTPUT_SCHEMA
    return Schema([*OUTPUT_SCHEMA.inputs, *(ColSpec("double", f"prob_{f}", required=False) for f in findings),
                   ColSpec("string", "findings_positive", required=False)])


def _flat(row: dict) -> dict:
    """One Product.predict row as the served model's columns (its findings spread out)."""
    out = {k: v for k, v in row.items() if k not in ("views", "findings", "findings_positive")}
    out.update({f"prob_{f}": p for f, p in row.get("findings", {}).items()})
    if "findings_positive" in row:
        out["findings_positive"] = ",".join(row["findings_positive"])
    return out


def input_schema(text_fields: tuple[str, ...] = ()) -> Schema:
    """The request's columns: `image`, and for a model that reads text the optional `text` (the
    first text field) and one optional column per text field (e.g. indication, comparison)."""
    if not text_fields:
        return INPUT_SCHEMA
    return Schema([ColSpec("string", "image"), ColSpec("string", "text", required=False),
                   *(ColSpec("string", f, required=False) for f in text_fields)])


def row_text(row: dict, fields: tuple[str, ...]) -> str | dict | None:
    """A request row's text: its text-field columns as {field: text}, else its `text` column, else
    None (a null cell is no text)."""
    given = {f: row[f] for f in fields if f in row and isinstance(row[f], str)}
    if given:
        if isinstance(row.get("text"), str):
            raise ValueError(f"give either 'text' or the columns {', '.join(fields)}, not both")
        return given
    return row["text"] if isinstance(row.get("text"), str) else None
# The file MLflow runs to build the model ("models from code": nothing unpickled).
_MODEL_CODE = "import mlflow\nfrom cxr_dist.product.serve import CXRPyfunc\n\nmlflow.models.set_model(CXRPyfunc())\n"
MAX_IMAGE_BYTES = 64 << 20  # a film larger than this (decoded from base64) is refused


class CXRPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour of a cxr-dist checkpoint (artifact "checkpoint")."""

    def load_context(self, context) -> None:
        from .inference import Product

        self.product = Product.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise _bad("the request needs a column 'image' of base64-encoded films")
        films, errors = [], []
        fields = tuple(self.product.loader.text_fields) if self.product.model.uses_text else ()
        for i, row in enumerate(model_input.to_dict("records")):
            name = f"row {i}"
            try:
                films.append(self.product.read(film_bytes(row["image"]), name, row_text(row, fields)))
            except ValueError as e:  # not base64, empty, too large
                errors.append(f"{name}: {e}")
            except UserError as e:  # inference.FilmError "row i: reason": unreadable, wrong DICOM, constant image...
                errors.append(str(e))
        if errors:  # every bad row, one line each, by its index; no probability for any row of a bad request
            raise _bad("\n".join(errors))
        rows = self.product.predict(films)
        return pd.DataFrame([_flat(r) for r in rows],
                            columns=[c.name for c in output_schema(self.product.model.findings).inputs
                                     if self.product.model.uses_text or not c.name.startswith("text")])


def film_bytes(value) -> bytes:
    """One cell of the `image` column -> the film's bytes. Base64 text may be line-wrapped (the
    `base64` tool wraps at 76 columns by default): whitespace and newlines are dropped first.
    Raises ValueError with the reason (null, not a string, not base64, empty, too large)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        raise ValueError("'image' is empty (null): send the film's file, base64-encoded")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"'image' is not base64 ({e})") from None
    else:
        kind = "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"
        raise ValueError(f"'image' must be a base64-encoded string, not {kind}")
    if not data:
        raise ValueError("'image' is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return data


# What the servable model imports, pinned to the versions it was logged with.
MODEL_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "safetensors", "scikit-learn",
                  "scipy", "pydicom", "python-gdcm", "pylibjpeg", "pylibjpeg-openjpeg", "mlflow")


def model_requirements() -> list[str]:
    """Pinned requirements of the logged model; explicit, so MLflow does not infer them in a
    subprocess (slow, may reach for the network). cxr_dist itself travels as code (serve.py)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in MODEL_PACKAGES:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def _bad(message: str) -> MlflowException:
    """A client error: the scoring server answers it with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def log_servable(tracker, checkpoint_dir: Path, example_image: bytes | None = None, name: str = "model") -> str | None:
    """Log the best checkpoint as the run's servable pyfunc model (through `tracker`, so nothing on
    other ranks and a tracking outage only warns); returns its "models:/..." URI or None."""
    import cxr_dist

    with tempfile.TemporaryDirectory(prefix="cxr-pyfunc-") as tmp:
        code = Path(tmp) / "cxr_model.py"
        code.write_text(_MODEL_CODE)
        example = None
        if example_image is not None:
            example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()]})
        # A model that reads text takes it in optional columns (its text fields, or `text`).
        config = json.loads((Path(checkpoint_dir) / "meta.json").read_text()).get("config", {})
        reads_text = config.get("model", {}).get("kind", "image") != "image"
        fields = tuple(section(config, LoaderConfig).text_fields) if reads_text else ()  # any config layout
        findings = tuple(json.loads((Path(checkpoint_dir) / "meta.json").read_text()).get("findings", ()))
        return tracker.log_pyfunc(
            name=name, python_model=str(code), artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(Path(cxr_dist.__file__).parent)],
            signature=ModelSignature(inputs=input_schema(fields), outputs=output_schema(findings)), input_example=example,
            pip_requirements=model_requirements())
