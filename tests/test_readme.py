"""Every code block of README.md runs as written.

* Python blocks run in order, in one fresh interpreter (a block may use the names an
  earlier one defined), in a temporary folder; a block whose first line is
  ``# name.py`` is the user's file of that name and is written there instead.
* Shell blocks marked ``<!-- tests/test_readme.py runs this block ... -->`` then run
  line by line in the same folder (``cdfast`` and ``python`` are this interpreter's).
* Every ``cdfast …`` command of the other shell blocks parses with the real parser.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DATA = os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
MARK = "<!-- tests/test_readme.py runs this block"


def blocks(text: str):
    """``(language, code, marked)`` of every fenced block, in order."""
    out = []
    for m in re.finditer(r"(?:^(<!--[^\n]*-->)\n)?^```(\w*)\n(.*?)^```", text, re.S | re.M):
        out.append((m.group(2), m.group(3), bool(m.group(1) and m.group(1).startswith(MARK))))
    return out


def test_the_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _, _ in blocks(README)]
    assert langs.count("python") >= 5 and sum(marked for *_, marked in blocks(README)) >= 1


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT)
    env.pop("TRITON_INTERPRET", None)  # as a user runs them
    return env


@pytest.mark.skipif(not os.path.isdir(DATA),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_readme_code_blocks_run(tmp_path):
    script = ["import os"]
    for lang, code, _ in blocks(README):
        if lang != "python":
            continue
        first = code.splitlines()[0].strip()
        if re.fullmatch(r"# [\w/]+\.py", first):
            script.append(f"open({first[2:]!r}, 'w').write({code!r})")
        else:
            script.append(code)
    r = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for lang, code, marked in blocks(README):
        if lang != "bash" or not marked:
            continue
        for line in code.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def test_readme_commands_parse():
    from cdfast.cli import build_parser

    parser = build_parser()
    seen = 0
    for lang, code, _ in blocks(README):
        if lang != "bash":
            continue
        for line in code.splitlines():
            for cmd in line.split("&&"):
                words = shlex.split(cmd.split("#")[0])
                if words[:1] == ["cdfast"] or words[:3] == ["python", "-m", "cdfast"]:
                    args = words[1:] if words[0] == "cdfast" else words[3:]
                    parser.parse_args(args)  # exits (SystemExit) on an option that does not exist
                    seen += 1
    assert seen >= 6
