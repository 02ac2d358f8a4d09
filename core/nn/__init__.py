"""Building blocks for models: torch modules that report their gates and masks to the pipeline."""
