"""The placement driver: checkers and schedulers propose operators, one
controller runs them (see docs/placement.md)."""
