"""The built-in experiment configs: the YAML files beside this one (`avpgan config list`).

A package only so that they ship inside the wheel as `avpgan.configs` (pyproject.toml maps this
folder there); `avpgan.builtin_configs` reads them.
"""
