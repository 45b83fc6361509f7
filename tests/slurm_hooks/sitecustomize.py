"""Test-only: tests/test_slurm.py puts this folder on the PYTHONPATH of the SLURM jobs it wants
held (slurm/train.sh and kfold.sh start `cxr_dist.train` themselves, so a wrapper module cannot be
named on their command line). Python imports `sitecustomize` at start-up; with CXR_TEST_HOLD=DIR
set, a process that then imports cxr_dist.train.loop (the training workers, nothing else) gets
tests/train_hooks.py's hold: after epoch 1's checkpoint each rank writes DIR/<run folder name>/
held-rank<R> and waits for DIR/<run folder name>/release. The test signals the job while it is
held, so the signal lands in the middle of training however slow or fast the machine is.

Lives in tests/ only: no product module reads CXR_TEST_HOLD.
"""
import os
import sys

if os.environ.get("CXR_TEST_HOLD"):
    import importlib.abc
    from pathlib import Path

    class _HoldWhenTheLoopIsImported(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "cxr_dist.train.loop":
                return None
            sys.meta_path.remove(self)  # once, and let the normal finders find the module
            from importlib.util import find_spec

            spec = find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_then_hold(module):
                exec_module(module)
                from tests.train_hooks import install_hold

                install_hold(Path(os.environ["CXR_TEST_HOLD"]), 1, loop=module, per_run=True)

            spec.loader.exec_module = exec_then_hold
            return spec

    sys.meta_path.insert(0, _HoldWhenTheLoopIsImported())
