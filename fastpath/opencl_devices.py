"""List the OpenCL platforms and devices of this machine and say which ones work.

``python -m fastpath.opencl_devices`` prints, for every device, its ``PYOPENCL_CTX`` selector
(``platform:device``), type, compute units, memory, float64 support, and whether a trivial kernel
builds and runs on it (and why not), then which device the ``opencl`` backend would pick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceReport:
    """One OpenCL device and whether it works."""

    selector: str  # the PYOPENCL_CTX value that selects it
    platform: str
    name: str
    kind: str
    compute_units: int
    global_mem_gib: float
    fp64: bool
    problem: str | None  # None when the probe kernel built and ran

    @property
    def works(self):
        return self.problem is None

    def __str__(self):
        verdict = "works" if self.works else f"FAILS: {self.problem}"
        return (f"PYOPENCL_CTX={self.selector:5s} {self.kind:4s} {self.name} [{self.platform}], "
                f"{self.compute_units} compute units, {self.global_mem_gib:.1f} GiB, "
                f"fp64 {'yes' if self.fp64 else 'no'}: {verdict}")


def list_devices():
    """A :class:`DeviceReport` for every device of every platform (an empty list without pyopencl/ICDs)."""
    from .opencl_runtime import cl, probe_device

    if cl is None:
        return []
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    reports = []
    for p, platform in enumerate(platforms):
        for d, device in enumerate(platform.get_devices()):
            kind = "GPU" if device.type & cl.device_type.GPU else "CPU" if device.type & cl.device_type.CPU else "other"
            reports.append(DeviceReport(
                selector=f"{p}:{d}", platform=platform.name.strip(), name=device.name.strip(), kind=kind,
                compute_units=device.max_compute_units, global_mem_gib=device.global_mem_size / 2**30,
                fp64="cl_khr_fp64" in device.extensions, problem=probe_device(device),
            ))
    return reports


def main():
    from .opencl_runtime import _PYOPENCL_IMPORT_ERROR, status

    if _PYOPENCL_IMPORT_ERROR is not None:
        print(f"pyopencl cannot be imported: {_PYOPENCL_IMPORT_ERROR}")
    reports = list_devices()
    if not reports:
        print("no OpenCL device found (see docs/howto/opencl_gpu.md: ICD files, OCL_ICD_VENDORS)")
    for report in reports:
        print(report)
    print(f"PYOPENCL_CTX is {os.environ.get('PYOPENCL_CTX', 'unset')!r}")
    print(status())
    return 0 if any(r.works for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
