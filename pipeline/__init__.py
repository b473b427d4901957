"""mnist-pipeline: the config, the wiring of the stages into Ray tasks, and the command line."""
