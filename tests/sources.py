"""Module-level sources for the tests: spawned workers import them by name."""
