"""medpipe: reproducible medical-image classification experiments as one DVC pipeline.

Layout: one module per dvc.yaml stage here (thin `run()` functions), the shared library in
`stages.lib`, commands outside the pipeline (predict, compare, pr-summary) in `stages.tools`.
See ARCHITECTURE.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
