"""What error= admits: the planner's check that every layer a query reads is within the bound."""
from __future__ import annotations

from metaql.approx.kind import is_projected
from metaql.errors import BinderException


def projected_errors(catalog, layers) -> dict[str, float]:
    """{layer: its projection's bound on the relative error's standard deviation} of projected layers."""
    out = {}
    for layer in layers:
        meta, _ = catalog.layer_meta(layer)
        if is_projected(meta):
            out[layer] = float(meta.extra["projection"]["error"])
    return out


def check_error(catalog, layers, error) -> dict[str, float]:
    """Refuses a projected layer in an exact query (no error=) or one whose bound exceeds error=.
    The summed score's relative error has standard deviation at most the largest layer bound
    (independent projections per layer: the variances add, each weighted by ||g_l||^2 ||q_l||^2,
    which sum to at most ||g||^2 ||q||^2), so the largest bound is the one error= must cover."""
    errs = projected_errors(catalog, layers)
    if not errs:
        return errs
    worst = max(errs, key=errs.get)
    if error is None:
        raise BinderException(
            f"layer '{worst}' is stored projected (relative error up to {errs[worst]:.3g}, one standard "
            f"deviation), so its scores are estimates: pass error={_up(errs[worst])} or more to accept them, "
            "or leave the projected layers out of layers=")
    if errs[worst] > error:
        raise BinderException(
            f"layer '{worst}' is stored projected with relative error up to {errs[worst]:.3g}, above "
            f"error={error:g}: raise error= to at least {_up(errs[worst])}, or leave the layer out of layers=")
    return errs


def _up(x: float) -> str:
    """x rounded up to 3 significant digits (a value the user can paste that passes)."""
    import math
    digits = 2 - int(math.floor(math.log10(x)))
    return f"{math.ceil(x * 10 ** digits) / 10 ** digits:g}"
