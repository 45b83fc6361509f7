"""Stage 4, product: a trained checkpoint as something people use.

    inference   Product: checkpoint -> model, temperature, threshold, OOD density; the one
                way every output path turns a film into a calibrated probability
    predict     `cxr-dist predict`
    serve       the servable MLflow pyfunc
    export      `cxr-dist export` (ONNX)
    cam         Grad-CAM overlays
    model_card  RUN_DIR/MODEL_CARD.md

May import: the root modules, data/, model/ and eval/. A new output format: a module here that
starts from `inference.Product.load(checkpoint)`.
"""
