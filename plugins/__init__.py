"""The built-in plugins. Each module is one technique and uses only ``steadytrain.__all__``."""
