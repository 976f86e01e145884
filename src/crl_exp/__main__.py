"""``python -m crl_exp [overrides]``: the Hydra entry point (see conf/config.yaml and the README)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from crl_exp.errors import CRLConfigError, MissingDependencyError
from crl_exp.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from crl_exp.app import run

    try:
        run(cfg)
    except (CRLConfigError, MissingDependencyError) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep records the failed job and goes on with the others
        # A configuration error is the user's to fix: one line and a non-zero exit, not a traceback.
        print(f"crl-exp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
