"""progadv_trl: progress advantage for LLM agents, from the checkpoint pair a KL-regularised TRL run leaves behind.

    from progadv_trl import ProgressScorer, ProgressCritic, ProgressAdvantageCallback

The names load lazily, so `import progadv_trl` (and the `progadv` CLI's start-up) does not import torch or TRL.
"""

__version__ = "0.1.0"

_LAZY = {
    "ProgressScorer": "engine",
    "ScoringConfig": "scoring",
    "ProgressCritic": "critic",
    "ProgressAdvantageCallback": "callback",
    "load_trajectories": "trajectories",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
