"""Builds the optional macOS bridge (native/mps_bridge.mm) with torch.utils.cpp_extension (macOS only).

    python native/build_mps_bridge.py      # then: QUANTATTN_MPS_BRIDGE=1 python your_script.py

Never run: no Mac exists where it was written (docs/metal.md).
"""

from __future__ import annotations

import sys

from quantattn_hf.backends.metal.mps import load_bridge

if __name__ == "__main__":
    if sys.platform != "darwin":
        sys.exit("the MPS bridge builds on macOS only")
    print(load_bridge(verbose=True))
