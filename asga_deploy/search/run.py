"""run_search: the search recipe run end to end (resume, checkpoints, outputs).

Layout: the run folder (default runs/search/<stem>-s<seed>/, see naming.py) holds checkpoint.pt
(after every epoch) and log.jsonl; the outputs beside the policy are <stem>.json, <stem>.search.jsonl
and <stem>.{bits,rho,cost}.png.
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_writable
from ..naming import search_run_dir
from ..progress import Callback
from .config import SearchConfig, SearchData, SearchDiagnosticError, SearchResult
from .recipe import SearchRecipe, check_run_dir
from .setup import prepare

__all__ = ["SearchConfig", "SearchData", "SearchDiagnosticError", "SearchResult", "default_run_dir", "prepare",
           "run_search"]


def default_run_dir(cfg: SearchConfig, root: str | Path = "runs/search") -> Path:
    """Return runs/search/<stem>-s<seed>."""
    return search_run_dir(cfg.stem(), cfg.seed, root)


def run_search(cfg: SearchConfig, data: SearchData, out_dir: str | Path = "policies",
               run_dir: str | Path | None = None, command: str | None = None, callback: Callback | None = None,
               resume: bool = False, force: bool = False, name: str | None = None) -> SearchResult:
    """Search a policy, checkpointing every epoch; write the policy, its search log and plots."""
    recipe = SearchRecipe(cfg, data, Path(run_dir) if run_dir is not None else default_run_dir(cfg), command,
                          callback)
    if name is not None and not force:  # a fixed name: refuse now, not after the search
        check_writable(Path(out_dir) / f"{name}.json", force)
    check_run_dir(recipe, resume, force)
    if resume:
        recipe.resume()
    recipe.run()
    return recipe.finish(out_dir, name, force)
