"""Stage 3, eval: predictions -> numbers, on one process or many.

    metrics    metrics from (key, prob, label), deduplicated; study pooling; intervals; breakdowns
    per_finding a findings head's AUROC per finding (masked targets), per source and view; macro mean
    calibrate  temperature scaling, ECE, Brier score
    ood        is an input a chest film like the training ones (constant-image refusal, Mahalanobis score)
    plots      the figures of a run
    evaluate   distributed inference on a split and its reports; `cxr-dist evaluate`
    text_audit `cxr-dist audit-text`: how much of the label each text field gives away (TF-IDF probe)

May import: the root modules, data/ and model/. A new metric: metrics.py (compute_metrics, and
config.VAL_METRICS if it may select checkpoints).
"""
