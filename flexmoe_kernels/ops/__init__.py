"""Functional ops. One op per file: routing, experts, the layer dispatch, backends."""
