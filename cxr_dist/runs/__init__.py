"""Stage 5, runs: where runs are recorded, compared and launched.

    tracking      MLflow on the main process (a do-nothing stand-in on the others), the registry
    compare       `cxr-dist compare` and `cxr-dist folds`
    paired        the paired AUROC gain of one run over another on the same images (`compare --paired`)
    fuse          `cxr-dist fuse`: a finished image run and text run -> one late-fusion run (checkpoint, files, MLflow)
    slurm_launch  each SLURM node's `accelerate launch` line (`python -m cxr_dist.runs.slurm_launch`)

May import: the root modules and the stages before it (data/, model/, eval/, product/).
"""
