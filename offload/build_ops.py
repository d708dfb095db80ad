"""Build DeepSpeed's ``cpu_adam`` and ``async_io`` ops once, ahead of any run (``make install``).

DeepSpeed JIT-compiles its C++ ops on first use (minutes on a small machine). ``offload.*=auto``
only picks ops that are already built (``offload.kernels.deepspeed_op_ready``), so a training run
never stalls in a compiler; this module is the one place that builds them. ``async_io`` needs
libaio's headers (Debian: ``apt-get install libaio-dev``); without them it is skipped with a note
and the NVMe tier uses the O_DIRECT thread pool.

Usage: ``python -m offload.build_ops``
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from offload.kernels import deepspeed_installed

    if not deepspeed_installed():
        print("deepspeed is not installed (pip install -e .[offload]); nothing to build")
        return 0
    from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder

    builders = [("cpu_adam", CPUAdamBuilder())]
    if AsyncIOBuilder().is_compatible(verbose=False):
        builders.append(("async_io", AsyncIOBuilder()))
    else:
        print("async_io: skipped, libaio headers not found (Debian: apt-get install libaio-dev)")
    for name, builder in builders:
        t0 = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as e:  # a failed build leaves the torch-native paths in charge
            print(f"{name}: build failed ({type(e).__name__}: {e}); torch-native path is used")
            continue
        print(f"{name}: ready ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
