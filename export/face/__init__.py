"""Face networks and the FLAME head model, in the layouts of the official weight files, with safe loaders."""
