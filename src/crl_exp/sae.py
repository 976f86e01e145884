"""``python -m crl_exp.sae [overrides]``: train (or re-use) and cache the SAE, i.e. ``python -m crl_exp mode=train_sae``."""

from __future__ import annotations

import sys

from crl_exp.__main__ import main

if __name__ == "__main__":
    if not any(arg.startswith("mode=") for arg in sys.argv[1:]):
        sys.argv.append("mode=train_sae")
    main()
