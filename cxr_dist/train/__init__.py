"""Stage 6, train: the training loop and what a run leaves behind.

    loop        the two-phase loop; `accelerate launch -m cxr_dist.train` runs its `main` (__main__.py)
    run         the run context: everything a training process holds, built once (Run.build)
    state       what a checkpoint holds besides the weights; resume
    end_of_run  the best checkpoint evaluated, the product fitted and saved, the run's files

May import everything below it: the root modules, data/, model/, eval/, product/, runs/.
"""
