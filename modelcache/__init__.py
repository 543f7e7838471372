"""modelcache: a model artifact cache for on-premises AI clusters."""

__version__ = "0.1.0"
