"""Numerics with no dependency on the rest of the package: the Philox random stream and the low-bit formats."""
