"""Approximation: projected storage (a seeded Kronecker-factored random projection of each layer's
factors), approximate influence under a stated error bound, and the two-phase top-k with its
certificate. Importing the package registers the 'projected' layer kind."""
from metaql.approx import kind as _kind  # noqa: F401
from metaql.approx import lowrank as _lowrank  # noqa: F401,E402  registers the low-rank query strategy
