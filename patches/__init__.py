"""Patches to mlc-llm for the Android app build (see ``series`` and ``pins.json``)."""
