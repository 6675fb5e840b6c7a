"""Planning on top of the simulator: parameter sweeps and the optimizer, on local or Dask executors."""
from .executors import DaskExecutor, LocalExecutor, SerialExecutor, make_executor
from .optimize import OptimizeResult, optimize
from .sweep import sweep

__all__ = ["sweep", "optimize", "OptimizeResult", "SerialExecutor", "LocalExecutor", "DaskExecutor",
           "make_executor"]
