"""How much of a chain of OpenCL layer calls is host <-> device transfer.

:func:`chain_transfer_share` times a small chain of backend calls with the activations resident on
the device and with a round trip through the host between layers, and accounts both with
profiling events (device time of the kernels and of the copies).
"""

from __future__ import annotations

import time

import numpy as np

from .opencl_runtime import cl


def copy_seconds(backend, nbytes, direction, repeat=3):
    """Device time (profiling event) of one host->device ("up") or device->host ("down") copy."""
    host = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
    buffer = cl.Buffer(backend.context, cl.mem_flags.READ_WRITE, host.nbytes)
    samples = []
    for _ in range(repeat):
        event = (cl.enqueue_copy(backend.queue, buffer, host) if direction == "up"
                 else cl.enqueue_copy(backend.queue, host, buffer))
        event.wait()
        samples.append((event.profile.end - event.profile.start) * 1e-9)
    return float(np.median(samples))


def chain_transfer_share(backend, rng, batch=16, channels=32, size=32, rate=0.5, repeat=5, dtype=np.float32):
    """Transfers of a perforated conv -> implicit max-pool -> conv chain, on the device and with host copies.

    The chain: a 3x3 perforated convolution (grid mask of ``rate``, compact output), a 2x2 max
    pooling reading the compact tensor through the composed index table, and a dense 3x3
    convolution of the pooled map. *Resident*: the input is uploaded once and only the final
    result is copied back. *Round trips*: every layer is called with NumPy arrays, so each
    activation goes device -> host -> device between layers (what a naive port does).

    Both chains are timed by wall clock (median of ``repeat``, after a check that they agree),
    and accounted with profiling events, which a busy host does not distort: the kernels' device
    time, and the device time of the copies each chain makes (the same sizes, copied alone).

    Returns
    -------
    dict with ``resident`` / ``round_trips`` (median wall seconds), ``kernel_seconds`` (events, one
    pass), ``copy_seconds_resident`` / ``copy_seconds_round_trips`` (events), the transfer shares
    ``copies / (copies + kernels)`` of both chains, and the bytes each chain copies.
    """
    from refimpl.conv import ConvGeometry, conv_output_shape
    from refimpl.implicit import compose_index_table, dense_index_map
    from refimpl.masks import grid_mask
    from refimpl.plan import PerforationPlan

    x = rng.standard_normal((batch, channels, size, size)).astype(dtype)
    w1 = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(dtype)
    w2 = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(dtype)
    b = np.zeros(channels, dtype=dtype)
    plan = PerforationPlan(grid_mask((size, size), rate, rng))
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (size, size), (size, size))
    pool_table = compose_index_table(plan.index_map, 2, 2, 0)
    pooled_hw = conv_output_shape((size, size), (2, 2), (2, 2), (0, 0))
    conv_table = compose_index_table(dense_index_map(pooled_hw), 3, 1, 1)
    params = [backend.to_device(a) for a in (w1, b, w2, b)]

    def chain(inp, weights):
        compact, _ = backend.conv_forward(inp, weights[0], weights[1], plan, geometry)
        pooled, _ = backend.table_pool_forward(compact, pool_table, "max")
        out, _ = backend.table_conv_forward(pooled, conv_table, weights[2], weights[3])
        return out

    def resident():
        return backend.to_host(chain(backend.to_device(x), params))

    def round_trips():
        return chain(x, (w1, b, w2, b))

    np.testing.assert_allclose(resident(), round_trips(), rtol=1e-5, atol=1e-6)  # and warms up
    times = {}
    for label, fn in (("resident", resident), ("round_trips", round_trips)):
        samples = []
        for _ in range(repeat):
            backend.synchronize()
            start = time.perf_counter()
            fn()
            backend.synchronize()
            samples.append(time.perf_counter() - start)
        times[label] = float(np.median(samples))
    backend.record_events = True
    backend.kernel_seconds()
    resident()
    kernel = backend.kernel_seconds()
    backend.record_events = False

    itemsize = np.dtype(dtype).itemsize
    compact_bytes = batch * channels * plan.width * itemsize
    pooled_bytes = batch * channels * pooled_hw[0] * pooled_hw[1] * itemsize
    copies_resident = [(x.nbytes, "up"), (pooled_bytes, "down")]
    copies_round_trips = [(x.nbytes, "up"), (w1.nbytes, "up"), (b.nbytes, "up"), (compact_bytes, "down"),
                          (compact_bytes, "up"), (pooled_bytes, "down"),
                          (pooled_bytes, "up"), (w2.nbytes, "up"), (b.nbytes, "up"), (pooled_bytes, "down")]
    copy_resident = sum(copy_seconds(backend, n, d) for n, d in copies_resident)
    copy_round_trips = sum(copy_seconds(backend, n, d) for n, d in copies_round_trips)
    return {
        "device": backend.device_name,
        "resident": times["resident"],
        "round_trips": times["round_trips"],
        "kernel_seconds": kernel,
        "copy_seconds_resident": copy_resident,
        "copy_seconds_round_trips": copy_round_trips,
        "transfer_share_resident": copy_resident / (copy_resident + kernel),
        "transfer_share_round_trips": copy_round_trips / (copy_round_trips + kernel),
        "bytes_resident": sum(n for n, _ in copies_resident),
        "bytes_round_trips": sum(n for n, _ in copies_round_trips),
    }
