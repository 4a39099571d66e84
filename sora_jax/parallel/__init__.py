"""Device meshes, the logical-axis rules table, and shardings for pytrees and activations."""
