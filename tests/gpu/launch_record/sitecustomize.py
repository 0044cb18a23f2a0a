"""Record every simulated kernel launch's argument types (tests only; on PYTHONPATH when asked).

With FLEETMPI_RECORD_LAUNCHES=FILE and NUMBA_ENABLE_CUDASIM=1, each process appends one
line per distinct (kernel, argument types) it launches: ``name<TAB>type, type, ...``.
The tests check these against ``kernels.gpu_compile.signatures()``, so the compile check
covers the launches the trainer really makes. Python imports ``sitecustomize`` at start-up
from sys.path; this one does nothing unless both variables are set.
"""

import os


def _install(path: str) -> None:
    from numba import typeof
    from numba.cuda.simulator import kernel as sim
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    seen: set[str] = set()
    launch = sim.FakeCUDAKernel.__call__

    def recording(self, *args):   # type: ignore[no-untyped-def]
        if not self._device and not sim._kernel_context:
            types = ", ".join(str(typeof(a._ary if isinstance(a, FakeCUDAArray) else a)) for a in args)
            line = f"{self.fn.__name__}\t{types}\n"
            if line not in seen:
                seen.add(line)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        return launch(self, *args)

    sim.FakeCUDAKernel.__call__ = recording


def _chain() -> None:
    """Run the sitecustomize this one shadows (a distribution's, later on sys.path), if any."""
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        path = os.path.join(os.path.abspath(entry or "."), "sitecustomize.py")
        if os.path.dirname(path) != here and os.path.isfile(path):
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), {"__name__": "sitecustomize", "__file__": path})
            return


_chain()
if os.environ.get("FLEETMPI_RECORD_LAUNCHES") and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _install(os.environ["FLEETMPI_RECORD_LAUNCHES"])
