"""``python -m crl_exp [overrides]``: the Hydra entry point (see conf/config.yaml and the README)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from crl_exp.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from crl_exp.app import run

    run(cfg)


if __name__ == "__main__":
    main()
