"""The corrector family: a penalty on what an output corrector changes, and pre-corrector
optimization; both read the corrections recorded with ``apply_corrector``."""
