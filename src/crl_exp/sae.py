"""Deprecated: ``python -m crl_exp.sae`` is ``python -m crl_exp mode=train_sae`` (one entry point). Kept one release:
it says so and runs that command."""

from __future__ import annotations

import sys

from crl_exp.__main__ import main

if __name__ == "__main__":
    print("crl_exp.sae is deprecated and will be removed: use `python -m crl_exp mode=train_sae ...`",
          file=sys.stderr)
    if not any(arg.startswith("mode=") for arg in sys.argv[1:]):
        sys.argv.append("mode=train_sae")
    main()
