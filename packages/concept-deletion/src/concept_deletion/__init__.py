"""Concept-deletion metric and concept-importance measures for any concept model."""

__version__ = "0.1.0"
