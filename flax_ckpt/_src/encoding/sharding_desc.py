"""JSON descriptions of shardings (metadata only: never required to load)."""

from __future__ import annotations

from typing import Any

import jax


def describe(sharding: Any) -> dict | None:
  """A JSON description of a ``jax.sharding.Sharding`` (mesh shape, axis names, spec)."""
  if sharding is None:
    return None
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh = sharding.mesh
    spec = []
    for axes in sharding.spec:
      if axes is None or isinstance(axes, str):
        spec.append(axes)
      else:
        spec.append(list(axes))
    return {
        "type": "NamedSharding",
        "mesh_shape": [int(mesh.shape[a]) for a in mesh.axis_names],
        "axis_names": [str(a) for a in mesh.axis_names],
        "spec": spec,
    }
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return {"type": "SingleDeviceSharding"}
  return {"type": type(sharding).__name__, "num_devices": len(sharding.device_set)}
