"""The zoo's synthetic language. It lives in :mod:`observables.language`, so that an installed
``suscept`` (``suscept run`` with ``[data] kind = "zoo"``) has it without a checkout; this module
keeps the experiments' import path."""

from observables.language import *  # noqa: F401,F403
from observables.language import Dataset, Language, make_dataset, repeated_random  # noqa: F401
