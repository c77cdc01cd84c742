"""seg: semantic segmentation as pure functions over explicit state (docs/design.md)."""
