"""GPU utilisation and memory per device, read through NVML at scrape time.

NVIDIA's NVML bindings (the ``nvidia-ml-py`` package, module ``pynvml``) are imported only when the first
scrape asks; a machine without the package, the driver's ``libnvidia-ml`` or a GPU gets no ``tensorwire_gpu_*``
series and no error. Series per device (label ``gpu`` = NVML's index, ``uuid`` = the GPU's UUID; NVML lists
every GPU of the machine, whatever ``CUDA_VISIBLE_DEVICES`` says):

- ``tensorwire_gpu_utilization``: fraction of the last sample period in which a kernel ran, 0.0-1.0
  (NVML's ``utilization.gpu`` percent / 100, as Triton's ``nv_gpu_utilization``);
- ``tensorwire_gpu_memory_used_bytes`` and ``tensorwire_gpu_memory_total_bytes``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tensorwire.metrics")


def _load_nvml() -> Any | None:
    """pynvml, initialised; ``None`` when the package, the driver library or the GPUs are missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
    except (pynvml.NVMLError, OSError) as err:
        log.debug("event=nvml_unavailable error=%r", err)
        return None
    return pynvml


#: The families this collector yields (per GPU, only where NVML finds one): utilisation, memory used, total.
FAMILIES = ("tensorwire_gpu_utilization", "tensorwire_gpu_memory_used_bytes", "tensorwire_gpu_memory_total_bytes")


class GpuCollector(Collector):
    """A Prometheus collector of per-GPU utilisation and memory; empty where NVML is unavailable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any | None = None
        self._tried = False

    def describe(self) -> list:
        return []  # no NVML call at registration

    def _library(self) -> Any | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._nvml = _load_nvml()
            return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The three per-GPU families, read now (called by each scrape, from the metrics HTTP thread)."""
        nvml = self._library()
        if nvml is None:
            return
        labels = ["gpu", "uuid"]
        utilization = GaugeMetricFamily(
            FAMILIES[0], "Fraction of the last sample period a kernel ran (0-1)", labels=labels
        )
        used = GaugeMetricFamily(FAMILIES[1], "GPU memory in use", labels=labels)
        total = GaugeMetricFamily(FAMILIES[2], "GPU memory in all", labels=labels)
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except nvml.NVMLError as err:  # a GPU fallen off the bus, or a query it does not support
                log.debug("event=nvml_query_failed gpu=%d error=%r", index, err)
                continue
            values = [str(index), uuid]
            utilization.add_metric(values, rates.gpu / 100.0)
            used.add_metric(values, float(memory.used))
            total.add_metric(values, float(memory.total))
        yield utilization
        yield used
        yield total
