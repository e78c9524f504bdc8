"""Experiment configs (installed as ``mmdit_configs``). Each file has ``get_config(arg=None)``."""
