"""The built-in corpus: English text every Python installation carries, so training needs no download.

Documents, in a fixed order: each topic of ``pydoc_data.topics`` (the language
reference behind ``help()``), then the docstrings of the standard-library modules
and their public classes, functions and methods, modules sorted by name.
"""

import contextlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from megamix.data.indexed import write_atomically
from megamix.data.prepare import prepare_data

# Bump when the corpus text or its preparation changes, so old caches are not reused.
VERSION = "v1"
NAME = "stdlib"
MAX_CHARS = 4_000_000
# Modules with side effects on import (a browser, a printed poem, a GUI), test
# suites, generated boilerplate (codecs), pydoc_data (its topics come first anyway)
# and platform-specific modules whose docs would make the corpus differ between machines.
EXCLUDED = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests",
    "lib2to3", "ensurepip", "distutils", "pydoc_data", "encodings", "msilib", "msvcrt", "nt", "winreg",
    "winsound", "posix", "pwd", "grp", "spwd", "nis", "crypt", "termios", "tty", "pty",
    "fcntl", "resource", "syslog", "ossaudiodev", "curses", "readline",
}

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MEGAMIX_CACHE``, else ``~/.cache/megamix``."""
    return Path(os.environ.get("MEGAMIX_CACHE") or Path.home() / ".cache" / "megamix")


def ensure_builtin(cache_dir: str | Path, vocab_size: int = 4096) -> str:
    """Prefix ``<cache_dir>/builtin-<VERSION>-<vocab_size>/stdlib`` of the prepared corpus
    (``.bin/.idx/.model/.json``), preparing it on first use.

    It is prepared in a temporary directory renamed into place, so concurrent or
    crashed runs never see a partial cache; when two runs race, the first rename wins.
    """
    cache_dir = Path(cache_dir)
    final_dir = cache_dir / f"builtin-{VERSION}-{vocab_size}"
    if not final_dir.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final_dir.name}-"))
        work_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        logger.info("preparing the built-in corpus in %s (first use only)", final_dir)
        try:
            prepare_builtin(work_dir, vocab_size)
            os.rename(work_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
            # Another run renamed its copy into place first.
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return str(final_dir / NAME)


def prepare_builtin(directory: Path, vocab_size: int) -> None:
    """Write the corpus as ``directory/stdlib.{bin,idx,model,json}``."""
    text_file = directory / f"{NAME}.jsonl"
    # Collecting docstrings imports hundreds of stdlib modules: do it in a child
    # process so the caller (a trainer) does not carry them around.
    script = f"import sys; from {__name__} import write_documents; write_documents(sys.argv[1])"
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when megamix is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script, str(text_file)], check=True, env=env)
    with quiet_datasets():
        info = prepare_data([str(text_file)], str(directory / NAME), vocab_size=vocab_size)
    text_file.unlink()
    metadata = json.loads(Path(info.metadata_path).read_text())
    # The text file was temporary; say where the text comes from instead.
    metadata["inputs"] = [f"{__name__}: pydoc topics and stdlib docstrings of Python {sys.version.split()[0]}"]
    write_atomically(info.metadata_path, json.dumps(metadata, indent=2).encode())


def builtin_documents() -> list[str]:
    """The corpus documents, at most MAX_CHARS characters in all."""
    from pydoc_data.topics import topics

    documents, seen, total = [], set(), 0
    candidates = [(f"{name}\n\n", topics[name]) for name in sorted(topics)]
    candidates += [(f"{name}\n\n", doc) for name, doc in stdlib_docstrings()]
    for title, doc in candidates:
        if doc in seen:
            continue
        total += len(title) + len(doc)
        if total > MAX_CHARS:
            break
        seen.add(doc)
        documents.append(title + doc)
    return documents


def stdlib_docstrings() -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the importable stdlib modules and their public objects."""
    for module in stdlib_modules():
        yield from module_docstrings(module)


def stdlib_modules() -> Iterator[ModuleType]:
    """Public stdlib modules and submodules, depth first in name order."""
    for name in sorted(sys.stdlib_module_names):
        yield from module_tree(name)


def module_tree(name: str) -> Iterator[ModuleType]:
    """Module ``name`` and its public submodules, leaving out those that fail to import or print."""
    if not public(name) or (module := import_quietly(name)) is None:
        return
    yield module
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda info: info.name):
        yield from module_tree(f"{name}.{info.name}")


def public(module_name: str) -> bool:
    return not any(part.startswith(("_", "xx")) or part in EXCLUDED for part in module_name.split("."))


def import_quietly(name: str) -> ModuleType | None:
    """The module, or None if importing it fails or writes output."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # any module that cannot be imported here is simply left out
        return None
    return None if output.getvalue() else module


def module_docstrings(module: ModuleType) -> Iterator[tuple[str, str]]:
    """Docstrings of the module, its public classes and functions defined in it, and their methods."""
    name = module.__name__
    yield from named_doc(name, module)
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isroutine(obj):
            yield from named_doc(f"{name}.{attr}", obj)
        elif inspect.isclass(obj):
            yield from named_doc(f"{name}.{attr}", obj)
            for method in sorted(vars(obj)):
                if not method.startswith("_") and inspect.isroutine(vars(obj)[method]):
                    yield from named_doc(f"{name}.{attr}.{method}", vars(obj)[method])


def named_doc(name: str, obj) -> Iterator[tuple[str, str]]:
    """(name, docstring) if ``obj`` has its own non-empty docstring."""
    with warnings.catch_warnings():
        # Some deprecated modules warn when their attributes are read.
        warnings.simplefilter("ignore")
        doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        yield name, inspect.cleandoc(doc)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide the progress bars of `datasets`: a cache filled on first use need not report."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def write_documents(path: str | Path) -> None:
    """Write the corpus documents as JSON lines ``{"text": ...}``."""
    with open(path, "w") as f:
        for document in builtin_documents():
            f.write(json.dumps({"text": document}) + "\n")
