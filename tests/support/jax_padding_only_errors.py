"""Bad data on a mesh where one device holds only padding, for
tests/adapters/test_jax_class_parallel.py, in a process of its own with 4 JAX CPU devices.

``class_parallel_cross_entropy`` over 4 devices of 3 rows with ``num_classes=9``: devices
0-2 hold the classes, device 3 only padding.  The devices that hold classes check the
label values (and a traced beta) in the core, inside their callbacks, before the first
all-reduce; if the padding-only device did not reach the same verdict it would wait in the
all-reduce alone until XLA aborts the whole process (SIGABRT, "Termination timeout for
all reduce", after about a minute).  That is why these cases run apart from
``jax_class_parallel_cases.py`` (an abort here loses only them) and under the test's
timeout.

``python jax_padding_only_errors.py``: prints one JSON line per case as it finishes,
``{"case": name, "error": "<type>: <message>"}`` or ``{"case": name, "loss": [...]}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lsoftmax_core.adapters.jax import class_parallel_cross_entropy  # noqa: E402

PARTS, LOCAL, CLASSES = 4, 3, 9  # device 3 holds rows 9-11: padding only


def _run(labels: list[int], beta: Any, grad: bool, nan_row: int | None = None) -> Any:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(labels), 5))
    if nan_row is not None:
        x[nan_row, 0] = np.nan
    w = rng.standard_normal((PARTS * LOCAL, 5))
    mesh = Mesh(np.array(jax.devices()[:PARTS]), ("classes",))

    def per_device(x: Any, w_local: Any, y: Any, b: Any) -> Any:
        return class_parallel_cross_entropy(
            x, w_local, y, axis_name="classes", num_classes=CLASSES, margin=2, beta=b, reduction="sum"
        )

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("classes"), P(), P()), out_specs=P())
    if grad:
        f = jax.grad(f, argnums=1)
    return jax.block_until_ready(jax.jit(f)(x, w, np.array(labels, np.int32), jnp.float64(beta)))


CASES = {
    # One label equal to num_classes: a padding row's index, on the padding-only device.
    "label=9": dict(labels=[0, 4, 9, 8], beta=1.0, grad=False),
    "label=9 under grad": dict(labels=[0, 4, 9, 8], beta=1.0, grad=True),
    "label=11": dict(labels=[0, 11, 2, 8], beta=1.0, grad=False),
    "label=-1": dict(labels=[0, 4, -1, 8], beta=1.0, grad=False),
    # A traced beta is checked when the callbacks run, as the labels are.
    "beta=-1": dict(labels=[0, 4, 2, 8], beta=-1.0, grad=False),
    # A NaN feature makes the combined lse NaN on every device; the backward's lse check
    # must then fail on the padding-only device too.
    "nan feature under grad": dict(labels=[0, 4, 2, 8], beta=1.0, grad=True, nan_row=1),
    # The same mesh with good data, for contrast.
    "good": dict(labels=[0, 4, -100, 8], beta=1.0, grad=False),
}


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    for name in names:
        try:
            out = {"case": name, "loss": np.asarray(_run(**CASES[name])).tolist()}
        except Exception as e:  # recorded for the test
            out = {"case": name, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
