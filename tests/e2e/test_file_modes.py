"""Files tunelab writes follow the user's umask, as other tools' output does: safetensors and Hugging Face's
save_pretrained create a private temporary file, which left model.safetensors at 0600 beside 0644 files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.helpers import run_cli


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_run_and_export_files_follow_the_umask(shared_data, tmp_path):
    out = tmp_path / "llama"
    previous = os.umask(0o027)  # inherited by the CLI subprocesses
    try:
        run_cli("train", "recipes/gpt-shakespeare-char.yaml", f"data.path={shared_data / 'tinyshakespeare' / 'input.txt'}",
                f"data.cache_dir={tmp_path / 'cache'}", "model.size=baby-llama", "train.max_steps=2",
                "train.compile=false", "eval.max_batches=1", "output.progress=false", "output.tensorboard=false",
                f"output.dir={out}")
        exported = Path(run_cli("export", out).stdout.strip().splitlines()[-1])
    finally:
        os.umask(previous)
    written = {**{f"final/{k}": v for k, v in modes(out / "final").items()},
               **{f"export/{k}": v for k, v in modes(exported).items()},
               "summary.json": modes(out)["summary.json"]}
    assert "final/model.safetensors" in written and "export/model.safetensors" in written
    assert {k: oct(v) for k, v in written.items()} == {k: oct(0o640) for k in written}
