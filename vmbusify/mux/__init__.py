"""The tunnel-mux: owns the hypervisor connections and fans packages out to workers by
(source entity, message id)."""
