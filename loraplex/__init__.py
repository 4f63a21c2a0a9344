"""loraplex: many LoRA adapters served on one resident base model, from a versioned registry.

One import namespace: ``loraplex.adapters`` (registry, CLI commands; torch-free), ``loraplex.server`` (engine,
API, vLLM backend; the ``[serve]`` extra), ``loraplex.trainer`` (QLoRA trainer; the ``[train]`` extra) and
``loraplex.cli`` (the ``loraplex`` command). The repository keeps them as the top-level folders ``adapters/``,
``server/`` and ``trainer/``; setuptools' package-dir maps them under this package.
"""

__version__ = "0.1.0"
