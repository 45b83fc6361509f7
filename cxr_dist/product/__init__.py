"""Stage 4, product: a trained checkpoint as something people use.

    inference     Product: Product.load(checkpoint) -> model, data settings, readout; Film (image,
                  name, optional text); the one way every output path turns a film into a
                  calibrated probability, label and OOD score
    readout       Readout: temperature, threshold, OOD density: the network's raw outputs -> the
                  product's (also what the end of training applies to its own predictions)
    predict       `cxr-dist predict`
    evaluate_cli  `cxr-dist evaluate` (the library it runs on is eval/evaluate.py)
    serve         the servable MLflow pyfunc
    export        `cxr-dist export` (ONNX)
    cam           Grad-CAM overlays
    model_card    RUN_DIR/MODEL_CARD.md

May import: the root modules, data/, model/ and eval/. A new output format: a module here that
starts from `inference.Product.load(checkpoint)`. Command modules (predict, evaluate_cli, export)
import torch and the model inside their functions, never at module level: `--help` stays instant.
"""
