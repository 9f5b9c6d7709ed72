"""``dpo_fast.kernels``: the Triton kernels, which live in the repository's top-level ``kernels/``.

The design card keeps the kernels in a top-level folder, but nothing may be *installed* or
*importable* as a top-level module named ``kernels``: that name belongs to PyPI's ``kernels``
package, which transformers probes for. So:

* the top-level ``kernels/`` folder has no ``__init__.py``: from the repository root,
  ``import kernels`` finds PyPI's package when it is installed (a regular package wins over a
  folder without ``__init__.py``), and without it only a namespace with no metadata, which
  transformers' probe reports as absent;
* this package is found through ``dpo_fast``'s own path, so it always belongs to the same
  checkout as ``dpo_fast`` (a source checkout on ``PYTHONPATH`` never picks up the kernels of
  another checkout installed in editable mode). In a source checkout (or an editable install)
  its search path is the checkout's ``kernels/``; a built wheel holds copies of those modules
  right here (``setup.py``'s ``build_py`` copies them).

Each module holds one family of kernels and the launchers that allocate their outputs; the
ops that wrap the launchers live in ``dpo_fast.ops``.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT_KERNELS = _HERE.parent.parent / "kernels"
if not any(path.name != "__init__.py" for path in _HERE.glob("*.py")) and _CHECKOUT_KERNELS.is_dir():
    __path__ = [str(_CHECKOUT_KERNELS)]
