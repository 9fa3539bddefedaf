"""What the compiled sketch decoder costs a process before its first update: importing numba (seconds and
resident memory), compiling the kernels into an empty cache, and loading them from a warm cache.

Each figure comes from a fresh interpreter: ``warm_up_decoder("sketch:bits=B")`` (what the aggregator calls at
its start) timed once with ``NUMBA_CACHE_DIR`` pointing at a new empty directory, then again with the same
directory, now holding the compiled kernels.

    python benchmarks/sketch_startup.py [--bits 2 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_IMPORT = """
import json, resource, time
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
import numba  # noqa: F401
seconds = time.perf_counter() - start
print(json.dumps({"s": seconds, "rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""

_WARM_UP = """
import json, time
from edgetrain.sdk.codecs import warm_up_decoder
start = time.perf_counter()
warm_up_decoder("sketch:bits={bits}")
print(json.dumps({{"s": time.perf_counter() - start}}))
"""


def run(code: str, cache_dir: str | None = None) -> dict[str, float]:
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                            timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args(argv)
    imported = run(_IMPORT)
    print(f"import numba: {imported['s']:.2f} s, +{imported['rss_mb']:.0f} MB peak RSS")
    for bits in args.bits:
        with tempfile.TemporaryDirectory() as cache:
            cold = run(_WARM_UP.format(bits=bits), cache)
            warm = run(_WARM_UP.format(bits=bits), cache)
        print(f"warm_up_decoder('sketch:bits={bits}'): empty cache {cold['s']:.2f} s (compiles), "
              f"cache filled {warm['s']:.2f} s (loads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
