"""GPU monitoring during a scoring job (nvidia-ml-py samples of memory, utilisation and power)."""
from __future__ import annotations

import threading

import numpy as np

__all__ = ["GpuMonitor"]


class GpuMonitor:
    def __init__(self, device, interval: float = 0.25):
        self.samples = []
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        self.device = device
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            self.nvml = pynvml
            idx = torch.device(device).index
            idx = torch.cuda.current_device() if idx is None else idx
            h = None
            try:
                uuid = str(torch.cuda.get_device_properties(idx).uuid)
                h = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            except Exception:  # noqa: BLE001 - fall back to the index
                h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.handle = h
            name = pynvml.nvmlDeviceGetName(h)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as e:  # noqa: BLE001 - no pynvml, no driver, ...
            self.error = f"{type(e).__name__}: {e}"
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        nv = self.nvml
        while not self._stop.wait(interval):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(self.handle).used
                util = nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
                try:
                    power = nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
                except Exception:  # noqa: BLE001
                    power = float("nan")
                self.samples.append((mem, util, power))
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
                return

    def stop(self) -> dict:
        import torch

        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        out = {"torch_max_allocated_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
        if self.error and not self.samples:
            out.update(nvml=False, nvml_error=self.error)
            return out
        a = np.array(self.samples, dtype=np.float64).reshape(-1, 3)
        out.update(nvml=True, name=self.name, samples=int(a.shape[0]))
        if a.shape[0]:
            out.update(mem_used_max_mib=round(float(a[:, 0].max()) / 2**20, 1),
                       util_mean_pct=round(float(a[:, 1].mean()), 1), util_max_pct=float(a[:, 1].max()),
                       power_mean_w=round(float(np.nanmean(a[:, 2])), 1) if np.isfinite(a[:, 2]).any() else None,
                       power_max_w=round(float(np.nanmax(a[:, 2])), 1) if np.isfinite(a[:, 2]).any() else None)
        return out

