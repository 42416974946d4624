"""The ASGA mixed-precision search: supernet, objective, budget controller and extraction, the search recipe."""

from .config import SearchConfig, SearchData, SearchDiagnosticError, SearchResult
from .controller import Controller, extract, temperature
from .objective import OBJECTIVES, RHO_RULES, ASGAStep, Radius, bn_stats_frozen
from .run import run_search
from .supernet import DEFAULT_BITS, MixedConv2d, MixedLinear, Supernet

__all__ = ["ASGAStep", "Controller", "DEFAULT_BITS", "MixedConv2d", "MixedLinear", "OBJECTIVES", "RHO_RULES",
           "Radius", "SearchConfig", "SearchData", "SearchDiagnosticError", "SearchResult", "Supernet",
           "bn_stats_frozen", "extract", "run_search", "temperature"]
