"""Adapters that put a pipeline into the trainers people already use."""
