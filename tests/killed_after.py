"""Run a module as `python -m` would, SIGKILLed the moment a named function first returns: a real kill at a real
step of the real code, for the tests of what the next command does about it.

    python -m tests.killed_after mlflow.MlflowClient.create_model_version -m stages.record --raw ...
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import signal
import sys


def kill_after(target: str) -> None:
    """Wrap `package.module.attr` or `package.module.Class.method` so that its first return kills this process."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
            break
        except ImportError:
            continue
    for name in parts[split:-1]:
        owner = getattr(owner, name)
    original = getattr(owner, parts[-1])

    @functools.wraps(original)
    def killed(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, parts[-1], killed)


if __name__ == "__main__":
    target, flag, module, *args = sys.argv[1:]
    assert flag == "-m", __doc__
    kill_after(target)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
