"""Process groups and the parallel layers that the model is built from."""
