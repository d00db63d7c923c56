"""`quantattn-calibrate` from a checkout: measure attention operands once, write static scales (docs/calibration.md)."""

import sys

from quantattn_hf.calibration.cli import main

if __name__ == "__main__":
    sys.exit(main())
