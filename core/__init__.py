"""Concepts shared by every package: errors, the IOSpec, the artifact manifest, atomic file I/O."""
