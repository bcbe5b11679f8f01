"""What escapes a node is reported under the node's display name, not the pack's module path.

ComfyUI reports a node's exception as ``exception_type`` = ``klass.__module__ + "." +
klass.__qualname__``, or the bare ``__qualname__`` when the module is ``builtins``
(``full_type_name`` in ``execution.py``, the same in 0.8.0 and 0.33.0). A custom node pack's module
is named after its folder's full path, so a user read
``/home/me/ComfyUI/custom_nodes/comfyui-tuner.trainer_core.errors.ConfigError``: frontend 1.49
prints it in front of the message in its errors panel, and the older error dialog in its report.
The dialog's title is the node's class name (``node_type``); the web extension retitles it.

So every node's ``execute`` re-raises what escapes it as an instance of a subclass of the original
class named after the node's display name, in module ``builtins``: ComfyUI then reports
``exception_type: "Train LoRA"``. Being a subclass, ``except ConfigError`` and ComfyUI's
out-of-memory check (``isinstance`` on torch's OOM error, which adds its tips) still match; the
traceback is the original one. The message is unchanged for errors meant for the user (they name the
file or option and the fix); anything else is a bug, and its message keeps the original class name
(``KeyError: 'x'``). ComfyUI's Cancel (``InterruptProcessingException``) passes through untouched.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from ..trainer_core.errors import TunerError
from ..trainer_core.worker import WorkerError
from . import comfy_bridge as bridge

FOR_THE_USER = (TunerError, WorkerError)  # their message says what to fix; no class name needed
_WRAPPED = "_tuner_readable_errors"
_classes: dict[tuple[str, type], type] = {}


def display_name(node_cls: type) -> str:
    """The node's display name (its class name should the schema itself fail)."""
    try:
        schema = node_cls.define_schema()
        return schema.display_name or schema.node_id
    except Exception:
        return node_cls.__name__


def _named_class(name: str, original: type[BaseException]) -> type[BaseException]:
    """A subclass of ``original`` that ComfyUI reports as ``name``."""
    key = (name, original)
    if key not in _classes:
        keep = issubclass(original, FOR_THE_USER)

        def __str__(self: BaseException) -> str:
            text = original.__str__(self)
            return text if keep else f"{original.__name__}: {text}"

        namespace = {"__module__": "builtins", "__qualname__": name, "__str__": __str__}
        try:
            _classes[key] = type(name, (original,), namespace)
        except TypeError:  # a class that refuses subclasses: still readable, without the isinstance match
            _classes[key] = type(name, (Exception,), namespace)
    return _classes[key]


def renamed(exc: Exception, name: str) -> BaseException:
    """``exc`` as an instance of :func:`_named_class`: same args, attributes and traceback."""
    klass = _named_class(name, type(exc))
    try:
        new = klass.__new__(klass, *exc.args)
        new.__dict__.update(getattr(exc, "__dict__", {}))
        new.args = exc.args
    except Exception:  # an exception type with an unusual constructor: keep its message at least
        new = _named_class(name, Exception)(str(exc))
    return new.with_traceback(exc.__traceback__)


def readable_errors(node_cls: type) -> type:
    """Wrap ``node_cls.execute`` so its errors carry the node's display name (see the module docstring)."""
    if node_cls.__dict__.get(_WRAPPED):
        return node_cls
    execute = node_cls.__dict__["execute"].__func__

    def reraise(cls: type, exc: Exception) -> None:
        if bridge.is_interrupt(exc):
            raise exc
        raise renamed(exc, display_name(cls)) from exc.__cause__

    if inspect.iscoroutinefunction(execute):

        @functools.wraps(execute)
        async def wrapped(cls: type, *args: Any, **kwargs: Any) -> Any:
            try:
                return await execute(cls, *args, **kwargs)
            except Exception as exc:
                reraise(cls, exc)

    else:

        @functools.wraps(execute)
        def wrapped(cls: type, *args: Any, **kwargs: Any) -> Any:
            try:
                return execute(cls, *args, **kwargs)
            except Exception as exc:
                reraise(cls, exc)

    node_cls.execute = classmethod(wrapped)
    setattr(node_cls, _WRAPPED, True)
    return node_cls
