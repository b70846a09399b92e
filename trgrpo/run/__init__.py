"""What a run is made of besides the model and the algorithm: the records that flow through the loop,
the prompt sampler, checkpoints, the metrics stream, host settings and interrupt handling."""
