"""The observable catalogue (registry and built-ins) lands with the observables issue.

For now an observable is any callable ``f(model) -> Tensor`` passed to
:func:`suscept.sample` by name.
"""

__all__: list[str] = []
