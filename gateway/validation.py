"""Transitional: engine.py imports GenerationRequest from here until it imports it from request.py."""

from bloomduo.gateway.request import GenerationRequest

__all__ = ["GenerationRequest"]
