"""Demonstrations that run the project end to end on its own machine."""
