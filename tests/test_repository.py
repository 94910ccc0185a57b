"""What every committed file must not hold: an absolute path of the machine that wrote it, or a
citation of a design file outside the repository (the loss's definition is docs/loss.md)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# absolute paths under work, home/<user>, root, Users, tmp, mnt or opt, not inside a word
# or a relative path (demo_output/work/ is fine).
OUTSIDE_DESIGN_FILE = "DESIGN" + ".md"  # (spelled so that this file does not hold it)
BUILD_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|root|Users|tmp|mnt|opt)/[\w.-]+")


def committed_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_committed_file_holds_a_build_machine_path_or_cites_an_outside_design_file():
    found = []
    for path in committed_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files (weights, images), and files deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if BUILD_PATH.search(line) or OUTSIDE_DESIGN_FILE in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_pattern_finds_what_it_is_for():
    assert BUILD_PATH.search('"model_dir": "/' + 'work/main/rpo_fast/demo/base"')
    assert BUILD_PATH.search("model /" + "home/alice/rpo-fast/base")
    assert not BUILD_PATH.search("demo_output/work/finetune/ and ~/rpo-fast/base")
