"""The core: the loop, its stages, and the run store they talk through."""
