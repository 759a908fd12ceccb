"""The Open Inference Protocol v2 gRPC adapter (KServe `inference.GRPCInferenceService` + gRPC health).

A transport beside `service.http`, never importing it (import-linter: commands > (http | grpc) >
core): tensors and the inference flow are `service.core.tensors`, statuses `service.core.status`.
`boostserve serve` starts it on `BOOSTSERVE_GRPC_PORT` (unset: no port is opened) inside the same
process and event loop as HTTP, so both share one scheduler, one budget and one readiness.
"""
