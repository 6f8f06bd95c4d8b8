"""The hardware a run uses: device and precision, memory layout and compilation, CPU speed-ups, memory estimates,
several GPUs, GPU monitoring."""
