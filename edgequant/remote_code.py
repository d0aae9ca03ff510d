"""Code that comes with a model folder (``auto_map`` → ``modeling_*.py`` / ``tokenization_*.py``) never runs
unless the user says so.

transformers runs such code when ``trust_remote_code=True``, and when the argument is left out it
*asks* on stdout ("Do you wish to run the custom code? [y/N]") and waits: a hang in CI and text in
front of ``--json`` output. Every ``from_pretrained`` edgequant makes on a model folder takes
``load_kwargs(folder)``: ``trust_remote_code`` given explicitly (False unless ``--trust-remote-code``
or ``EDGEQUANT_TRUST_REMOTE_CODE=1``), so transformers never prompts; a folder that asks for its own
code gets one line saying what it asked for, and where transformers cannot load it without that
code, ``refused`` turns its error into one line naming the flag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from edgequant.errors import EdgequantError

ENV = "EDGEQUANT_TRUST_REMOTE_CODE"
FLAG = "--trust-remote-code"
log = logging.getLogger("edgequant")
_warned: set[str] = set()


def set_trust_remote_code(trust: bool) -> None:
    """The ``--trust-remote-code`` flag (recorded in the environment, so child processes inherit it)."""
    if trust:
        os.environ[ENV] = "1"


def trusted() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def asked_for(folder: str | Path) -> list[str]:
    """What a folder's ``auto_map`` entries ask to run, e.g. ``AutoTokenizer → tokenization_x.XTokenizer``."""
    folder = Path(folder)
    asks: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for key, ref in auto_map.items():
            refs = ref if isinstance(ref, list) else [ref]
            shown = ", ".join(str(r) for r in refs if r)
            if shown:
                asks.append(f"{name}: {key} → {shown}")
    return asks


def load_kwargs(folder: str | Path) -> dict:
    """Keyword arguments for ``from_pretrained`` on ``folder``: ``trust_remote_code`` always explicit."""
    trust = trusted()
    asks = asked_for(folder) if Path(folder).is_dir() else []
    key = str(Path(folder).resolve()) if asks else ""
    if asks and not trust and key not in _warned:
        _warned.add(key)
        log.warning("%s asks to run its own code (%s); not run: edgequant uses transformers' built-in classes "
                    "(pass %s to allow it)", folder, "; ".join(asks), FLAG)
    return {"trust_remote_code": trust}


@contextlib.contextmanager
def refused(folder: str | Path):
    """One line instead of transformers' error when a folder can only load with its own code."""
    try:
        yield
    except (ValueError, OSError) as e:
        if "trust_remote_code" not in str(e) or trusted():
            raise
        asks = "; ".join(asked_for(folder)) or "custom code"
        raise EdgequantError(f"{folder} needs its own code to load ({asks}); edgequant never runs model-folder code "
                             f"unless you pass {FLAG} (read that code first)") from None
