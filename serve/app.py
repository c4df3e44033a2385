"""The import path of the scoring service for Serve configs and `serve run`.

    serve run serve/config.yaml                          (from the repository root)
    serve run serve.app:app_builder model_path=DIR       (the same application, args on the command line)

Everything lives in :mod:`btrm.serving`; this module only names it.
"""

from btrm.serving import app_builder

__all__ = ["app_builder"]
