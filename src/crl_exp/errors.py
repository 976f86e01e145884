"""Errors a user can act on. Raised before any heavy work wherever the problem is knowable up front."""


class CRLConfigError(ValueError):
    """The configuration asks for something impossible or inconsistent (bad layer, mismatched SAE, ...)."""


class MissingDependencyError(ImportError):
    """An optional package needed for the requested configuration is not installed; says what to install."""
