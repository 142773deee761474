"""What `ProgressAdvantageCallback` owns while a trainer runs: figures from captured rollouts (`figures`), the
held-out set scored during training (`heldout`), and what it writes (`outputs`: parquet and tracker tables, the
critic bundle). The callback (progadv_trl/callback.py) only wires trainer events to them; TRL internals are read
in progadv_trl/trl_hooks.py alone."""
