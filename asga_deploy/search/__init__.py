"""The ASGA mixed-precision search: supernet, objective, budget and extraction, the search run."""

from .budget import Controller, extract, mck_solve, temperature
from .objective import OBJECTIVES, RHO_RULES, ASGAStep, Radius, bn_stats_frozen
from .run import SearchConfig, SearchData, SearchDiagnosticError, SearchResult, run_search
from .supernet import DEFAULT_BITS, MixedConv2d, MixedLinear, Supernet

__all__ = ["ASGAStep", "Controller", "DEFAULT_BITS", "MixedConv2d", "MixedLinear", "OBJECTIVES", "RHO_RULES",
           "Radius", "SearchConfig", "SearchData", "SearchDiagnosticError", "SearchResult", "Supernet",
           "bn_stats_frozen", "extract", "mck_solve", "run_search", "temperature"]
