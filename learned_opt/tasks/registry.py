"""The task registry, and tasks named by where they live.

A task is named on the command line (``--task``) and in Python (:func:`get`) in one of three ways:

* a registered name: the package's own tasks, and those that installed packages register through
  the ``learned_opt.tasks`` entry-point group (``name = "package.module:ClassName"``);
* ``path/to/file.py:ClassName``: a :class:`~learned_opt.tasks.Task` subclass in a file;
* ``package.module:ClassName``: one in an importable module.

A task loaded from a file or module is registered under its ``name`` for the rest of the process
(loading another file with a task of that name replaces it); the name of a package's task or an
installed one is refused. :func:`source_of` gives the string that
finds a task again (what a corpus store records, so that ``learned-opt train`` needs no ``--task``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, cast

from ..errors import ConfigError, UnknownTaskError
from ..fileio import is_plain_name
from .base import Task

ENTRY_POINT_GROUP = "learned_opt.tasks"

_REGISTRY: dict[str, Callable[[], Task]] = {}
_SOURCES: dict[str, str] = {}  # name -> "file.py:Class" / "module:Class" for tasks loaded by reference
_LOADED_BY_REFERENCE: set[str] = set()  # names a file or module registered (the latest load wins)


def register(name: str, factory: Callable[[], Task], source: str | None = None) -> None:
    """Add a task factory under ``name``; ``source`` is the reference it was loaded from, if any."""
    _REGISTRY[name] = factory
    if source:
        _SOURCES[name] = source


def _load_entry_points() -> None:
    """Register the tasks that installed packages declare (once; broken ones are skipped with the reason kept)."""
    if _REGISTRY.get("__entry_points_loaded__"):
        return
    _REGISTRY["__entry_points_loaded__"] = lambda: None  # type: ignore[assignment, return-value]  # a marker
    try:
        points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - a broken environment must not break the built-in tasks
        return
    for point in points:
        if point.name not in _REGISTRY:
            # cast: mypy cannot infer a lambda with a default argument against Callable[[], Task]
            _REGISTRY[point.name] = cast(Callable[[], Task], lambda p=point: _instantiate(p.load(), p.value))
            _SOURCES[point.name] = point.value


def names() -> list[str]:
    """Names of all registered tasks (the package's and those of installed packages)."""
    _load_entry_points()
    return sorted(n for n in _REGISTRY if not n.startswith("__"))


def get(name: str | Task) -> Task:
    """The task called ``name``: a registered name, ``file.py:Class`` or ``module:Class``
    (module docstring); a :class:`Task` is returned as is."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or not name:
        raise UnknownTaskError(f"a task is a name or 'file.py:ClassName', got {name!r}")
    _load_entry_points()
    if name in _REGISTRY and not name.startswith("__"):
        return _REGISTRY[name]()
    if ":" in name:
        return _load_reference(name)
    if name.endswith(".py"):
        raise UnknownTaskError(f"{name!r} is a file: name the task class in it too, as {name}:ClassName")
    raise UnknownTaskError(
        f"unknown task {name!r}; known tasks: {', '.join(names()) or 'none'}; or name a Task subclass "
        "as path/to/file.py:ClassName or package.module:ClassName"
    )


def source_of(task: Task) -> str:
    """What finds ``task`` again with :func:`get`: its reference if it was loaded by one, else its name."""
    return _SOURCES.get(task.name, task.name)


def _load_reference(ref: str) -> Task:
    where, _, cls_name = ref.rpartition(":")
    if not where or not cls_name.isidentifier():
        raise UnknownTaskError(f"task reference {ref!r} must be path/to/file.py:ClassName or package.module:ClassName")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise UnknownTaskError(f"task file {where!r} does not exist; give the path of a .py file "
                                   f"that defines {cls_name}")
        if path.suffix != ".py":  # Python would find no loader for it
            raise UnknownTaskError(f"task file {where!r} is not a .py file; give the Python file that defines {cls_name}")
        module_name = f"learned_opt_user_task_{abs(hash(str(path.resolve())))}"
        try:
            if module_name in sys.modules:
                module = sys.modules[module_name]
            else:
                spec = importlib.util.spec_from_file_location(module_name, path)
                assert spec is not None and spec.loader is not None  # a .py file (checked above) always has both
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file: say where it failed
            sys.modules.pop(module_name, None)
            raise UnknownTaskError(f"task file {where!r} raised on import: {type(exc).__name__}: {exc}; "
                                   "fix the file and run again") from None
        source = f"{path.resolve()}:{cls_name}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise UnknownTaskError(f"cannot import task module {where!r} ({type(exc).__name__}: {exc}); "
                                   "install it or give a file path instead") from None
        source = ref
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, Task) and not getattr(v, "__abstractmethods__", None))
        raise UnknownTaskError(f"{where!r} has no class {cls_name!r}; tasks defined there: {', '.join(found) or 'none'}")
    task = _instantiate(cls, ref)
    known = _REGISTRY.get(task.name)
    if known is not None and known is not cls and task.name not in _LOADED_BY_REFERENCE:
        raise UnknownTaskError(f"task {ref!r} is named {task.name!r}, which is already a registered task; "
                               "give your task another name")
    if known is not cls:  # a registered class named by its module is that task; a user's file may be reloaded
        register(task.name, cls, source)
        _LOADED_BY_REFERENCE.add(task.name)
    return task


def _instantiate(cls, ref: str) -> Task:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UnknownTaskError(f"{ref!r} is not a learned_opt.tasks.Task subclass")
    try:
        task = cls()
    except TypeError as exc:  # abstract methods left out, or a constructor that needs arguments
        raise UnknownTaskError(f"cannot create task {ref!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's constructor: say where it failed
        raise UnknownTaskError(f"task {ref!r} raised when created: {type(exc).__name__}: {exc}; "
                               "fix its __init__ and run again") from None
    if not isinstance(getattr(task, "name", None), str) or not task.name:
        raise UnknownTaskError(f"task {ref!r} needs a class attribute name = '...'")
    if not is_plain_name(task.name):  # it names the files made for the task (NAME.json, NAME.safetensors)
        raise UnknownTaskError(f"task {ref!r} is named {task.name!r}: a task's name becomes a file name, so give "
                               f"it one without '/', '\\' or NUL that does not start with '.'")
    try:
        task.signature  # noqa: B018 - builds the model (on the meta device): a broken build_model fails here
    except Exception as exc:  # noqa: BLE001 - the user's model: say where it failed
        raise UnknownTaskError(f"task {ref!r}: build_model() raised {type(exc).__name__}: {exc}; fix it and "
                               f"run again") from None
    return task


def for_generator(gen, override: str | Task | None = None, *, kind: str | None = None, what: str = "this command") -> Task:
    """The task a generator serves: ``override`` (a ``--task``) if given, else the registered task
    its manifest names, else the file or module the manifest records it was loaded from.

    ``kind`` (``"supervised"`` / ``"control"``) refuses tasks of the other kind, naming ``what``
    needs it. Raises :class:`ConfigError` saying what to do when the task cannot be found, is of
    another kind, or has another network than the generator's.
    """
    from ..layout import shape_differences

    if override is not None:
        task = get(override)
    else:
        source = (gen.manifest.get("corpus") or {}).get("task_source") if isinstance(gen.manifest, dict) else None
        try:
            task = get(gen.task)
        except UnknownTaskError:
            if not source:
                raise ConfigError(f"generator {gen.name!r} is for task {gen.task!r}, which is not registered "
                                       "here; name it with --task path/to/file.py:ClassName") from None
            try:
                task = get(source)
            except UnknownTaskError as exc:
                raise ConfigError(f"generator {gen.name!r} is for task {source}, which cannot be loaded now "
                                       f"({exc}); name it with --task path/to/file.py:ClassName") from None
    if kind is not None and task.kind != kind:
        raise ConfigError(f"{what} measures {kind} tasks; {task.name!r} is a {task.kind} task")
    names, shapes = zip(*task.signature)
    diffs = shape_differences(gen.layout.signature, names, shapes)
    if diffs:
        raise ConfigError(
            f"generator {gen.name!r} (task {gen.task!r}, {gen.layout.num_params:,} parameters) does not fit the "
            f"network of task {task.name!r} ({task.num_params:,} parameters): {'; '.join(diffs[:3])}"
            + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            + f"; pass a generator made for {task.name!r}, or --task naming the generator's own task"
        )
    return task
