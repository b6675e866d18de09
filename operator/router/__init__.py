"""fleetserve's model-aware router: one per InferenceService, in front of its runtime pods.

Modules (each owns one thing; none imports torch or the runtime):
- config.py: RouterConfig, the typed knobs (read from FLEETSERVE_ROUTER_* env).
- balancer.py: which replica gets a request (prefix-affinity key, consistent hashing with bounded
  load, least outstanding requests, saturation). Pure: no I/O.
- discovery.py: ready replicas from the apiserver by watching EndpointSlices (v1, v1beta1 on 1.20)
  or Endpoints, and the demand signal written onto the InferenceService while cold.
- proxy.py: the aiohttp server: forwards requests, streams SSE through, retries before the first
  response byte, holds requests while there is no replica, exports metrics.

Run: `python -m fleetserve.operator.router` (the operator image; the operator renders its Deployment).
"""
