"""Clos-network layers: compact replacements for dense nn.Linear layers, fitted to them."""
from .fit import fit_clos, fit_to_dense, relative_error
from .layer import Clos, default_factors

__all__ = ["Clos", "default_factors", "fit_clos", "fit_to_dense", "relative_error"]
