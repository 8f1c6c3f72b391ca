"""Test helpers shared across test folders (real servers, no mocks of our own stack)."""
