"""The gRPC ext_proc server: servicer (decode + dispatch) and the per-request processor."""
