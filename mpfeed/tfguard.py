"""What ``import tensorflow`` (or Keras) gives inside a worker: inert stand-ins that fail loudly when used.

Workers never load TensorFlow: it would cost seconds and hundreds of MB per worker, start its thread pools,
and a process forked from it can deadlock. A training script imports TensorFlow at the top and may define
its source beside it, so a worker that imports the script must get past lines such as
``AUTOTUNE = tf.data.AUTOTUNE``, ``class Clock(keras.callbacks.Callback)``, ``with tf.device(...)`` or
``for gpu in tf.config.list_physical_devices("GPU")``. Stand-ins allow exactly that: attribute access, calls,
subclassing and decorating always; iteration, ``len``, truth, ``with``, ``==``, ``!=`` and ``str()`` only
while the script is being imported. Anything that would need a real value (converting to an array,
arithmetic, or any use of those while the source runs) raises `TensorFlowInWorkerError`, instead of
giving empty or wrong data.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

GUARDED_MODULES = ("tensorflow", "keras", "tf_keras")
_lenient = False  # true while a worker imports the user's main script


class TensorFlowInWorkerError(RuntimeError):
    """A source used TensorFlow (or Keras) inside an mpfeed worker."""


def _refuse(name: str, use: str) -> TensorFlowInWorkerError:
    return TensorFlowInWorkerError(
        f"TensorFlow cannot run in mpfeed workers: {use} {name}. Workers never load TensorFlow (its threads "
        "and memory in every worker, and forking it can deadlock), so `import tensorflow` gives an inert "
        "stand-in there. Do this work with numpy or Pillow in the source (PIL.Image.open(...) decodes "
        "JPEGs), or in the tf.data pipeline after feeder.dataset(), with .map(...)"
    )


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name == "__version__":
            return "0+inert"
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{self.__name__}.{name}")


class _Refusals:
    """What stand-ins do when used: refuse anything that needs a real value. Shared by stand-ins for
    modules' attributes (classes, see `_StandIn`) and for what calling them returns (`_StandInValue`)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{_name(self)}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _StandInValue(f"{_name(self)}()")

    def __iter__(self):
        _lenient_or_refuse(self, "iterating over")
        return iter(())

    def __len__(self) -> int:
        _lenient_or_refuse(self, "len() of")
        return 0

    def __bool__(self) -> bool:
        _lenient_or_refuse(self, "the truth value of")
        return False  # as an empty list of devices would be

    def __enter__(self) -> Any:
        _lenient_or_refuse(self, "`with`")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def __getitem__(self, key: Any) -> Any:
        return _StandInValue(f"{_name(self)}[]")

    def __eq__(self, other: object) -> bool:
        _lenient_or_refuse(self, "comparing (==)")
        return self is other

    def __ne__(self, other: object) -> bool:
        _lenient_or_refuse(self, "comparing (!=)")
        return self is not other

    __hash__ = object.__hash__  # by identity, as before: stand-ins stay usable as keys and in sets

    def __str__(self) -> str:  # f-strings and format() come here too
        _lenient_or_refuse(self, "str() of")
        return repr(self)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse(_name(self), "converting to an array")

    def __index__(self) -> int:
        raise _refuse(_name(self), "using as a number")

    def __int__(self) -> int:
        raise _refuse(_name(self), "using as a number")

    def __float__(self) -> float:
        raise _refuse(_name(self), "using as a number")

    def __repr__(self) -> str:
        return (
            f"<inert stand-in for {_name(self)}: mpfeed workers never load TensorFlow; "
            "do the work with numpy or Pillow>"
        )


class _StandIn(_Refusals, type):
    """A stand-in for a TensorFlow or Keras attribute. It is a class, so a script may subclass it at its
    top level (``class Clock(keras.callbacks.Callback)``) or decorate with it."""


class _StandInValue(_Refusals):
    """What calling a stand-in returns (``tf.zeros(3)``): an object, since numpy never asks a class for
    ``__array__`` and would silently make an empty object array of it."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_stand_in_name", name)


def _name(stand_in: Any) -> str:
    if isinstance(stand_in, type):
        return stand_in.__qualname__
    return object.__getattribute__(stand_in, "_stand_in_name")


def _arithmetic(symbol: str):
    def refuse(self: Any, *other: Any) -> Any:
        raise _refuse(_name(self), f"arithmetic ({symbol}) on")

    return refuse


for _name_, _symbol in {
    "add": "+", "sub": "-", "mul": "*", "matmul": "@", "truediv": "/", "floordiv": "//", "mod": "%",
    "pow": "**", "lshift": "<<", "rshift": ">>", "and": "&", "xor": "^", "or": "|",
}.items():  # fmt: skip
    for _form in (f"__{_name_}__", f"__r{_name_}__"):
        setattr(_Refusals, _form, _arithmetic(_symbol))
for _form, _symbol in {
    "__neg__": "-", "__pos__": "+", "__abs__": "abs", "__invert__": "~",
    "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=",
}.items():  # fmt: skip
    setattr(_Refusals, _form, _arithmetic(_symbol))


def _lenient_or_refuse(stand_in: Any, use: str) -> None:
    if not _lenient:
        raise _refuse(_name(stand_in), use)


def _stand_in(name: str) -> type:
    stand_in = _StandIn(name.rsplit(".", 1)[-1], (), {"__module__": name.rsplit(".", 1)[0]})
    stand_in.__qualname__ = name
    return stand_in


class _TensorFlowGuard(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of TensorFlow and Keras (and their submodules) with `_InertModule`s."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in GUARDED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """From now on, this process imports stand-ins for TensorFlow and Keras."""
    sys.meta_path.insert(0, _TensorFlowGuard())


class lenient:
    """While a worker imports the user's main script: stand-ins allow iteration, len, truth and `with`."""

    def __enter__(self) -> None:
        global _lenient
        _lenient = True

    def __exit__(self, *exc_info: Any) -> None:
        global _lenient
        _lenient = False
