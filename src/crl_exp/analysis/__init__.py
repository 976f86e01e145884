"""Interpretability outputs of CRL: intervention logs, HTML reports, branch points, critic and layer analyses."""
