"""Storage layer: the contract (:mod:`.base`) and its implementations."""
