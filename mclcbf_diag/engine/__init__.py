"""The engine: runs the model with an intervention's sites open, in batches, continuing a shared prefix."""
