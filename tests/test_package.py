"""What an installed package promises: its version, its type marker, its imports and their cost."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import newt

DISTRIBUTION = "newt-lr"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_version_is_written_once_and_the_metadata_reads_it():
    assert importlib.metadata.version(DISTRIBUTION) == newt.__version__
    assert importlib.metadata.metadata(DISTRIBUTION)["License-Expression"] == "MIT"


def _editable() -> bool:
    """Whether this is an editable install (``pip install -e``), whose record lists no package files."""
    text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or "{}"
    return bool(json.loads(text).get("dir_info", {}).get("editable", False))


def test_the_package_says_it_is_typed():
    assert (pathlib.Path(newt.__file__).parent / "py.typed").is_file()
    if not _editable():  # an installed wheel: the marker is one of its files
        files = importlib.metadata.files(DISTRIBUTION) or []
        assert any(f.name == "py.typed" for f in files), "py.typed is not in the installed files"


def test_import_newt_does_not_import_dtensor_or_sympy():
    # DTensor's module pulls in sympy (about half a second); only sharded training needs it.
    result = _run(
        "import sys, torch\n"
        "before = {m for m in ('torch.distributed.tensor', 'sympy') if m in sys.modules}\n"
        "import newt\n"
        "after = {m for m in ('torch.distributed.tensor', 'sympy') if m in sys.modules}\n"
        "print(sorted(after - before))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_huggingface_integration_without_transformers_names_the_extra():
    # sys.modules[name] = None makes "import name" raise ModuleNotFoundError, as if not installed.
    result = _run(
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import newt.integrations.huggingface"
    )
    assert result.returncode != 0
    assert "pip install 'newt-lr[huggingface]'" in result.stderr
