"""Where crl-exp keeps caches and where it looks for benchmark data.

Caches (converted models, trained SAEs) default to ``$CRL_CACHE_DIR`` or ``~/.cache/crl_exp``; benchmark
files are read in place from ``$CRL_DATA_DIR`` (default ``../shared/benchmarks`` next to the checkout) and
never copied into the repository.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from crl_exp.errors import CRLConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"


def config_option(group: str, name: str):
    """``conf/<group>/<name>.yaml`` read outside Hydra's composition (a model for a test, another task for an
    analysis), its defaults list dropped: the typed dataclass behind ``base_<group>`` supplies those defaults when
    the node is read. Unknown names are refused with the valid ones."""
    from omegaconf import OmegaConf

    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise CRLConfigError(f"{group}={name!r} is not a {group}; valid: {', '.join(valid)}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return node


def default_cache_dir() -> Path:
    env = os.environ.get("CRL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "crl_exp"


def default_data_dir() -> Path:
    env = os.environ.get("CRL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return PROJECT_ROOT.parent / "shared" / "benchmarks"


def ensure_writable_dir(path: str | os.PathLike, purpose: str) -> Path:
    """Create ``path`` if needed and prove we can write into it, with an actionable error otherwise."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise CRLConfigError(
            f"The {purpose} folder {str(p)!r} is not writable ({exc.strerror or exc}). "
            f"Point it elsewhere, e.g. `cache_dir=/some/writable/dir` or the env var CRL_CACHE_DIR."
        ) from exc
    return p
