"""edm-deploy: train, export and deploy EDM diffusion denoisers.

Importing this package is cheap and never imports torch: the heavy parts (training, export,
backends) load on first use. The embedding API is::

    import edm_deploy
    den = edm_deploy.load("model.onnx")                  # or a .plan engine or a .pt checkpoint
    images = edm_deploy.generate(den, seeds=range(16))   # uint8 NHWC
"""

from __future__ import annotations

from edm_deploy.runtime.core.version import __version__

__all__ = ["__version__", "load", "generate"]


def __getattr__(name: str):
    # Lazy re-exports keep `import edm_deploy.runtime` free of torch and of backend libraries.
    if name == "load":
        from edm_deploy.loading import load

        return load
    if name == "generate":
        from edm_deploy.runtime.sampling.generate import generate

        return generate
    raise AttributeError(f"module 'edm_deploy' has no attribute {name!r}")
