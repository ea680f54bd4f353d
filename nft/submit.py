"""``python -m nft.submit train --config params.yaml ...``: that ``nft`` command as a SLURM job with the params
file's ``study.slurm`` resources, waited for (nft/slurm.py). DVC's train stage runs it when ``study.launcher`` is
``python -m nft.submit``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``python -m nft.submit train --config params.yaml ...``: the params file's ``study.slurm`` job for that
    command (validated first, with the rest of the file)."""
    from .config import ConfigError, load_study
    from .slurm import submit

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "--config" not in argv:
        print("usage: python -m nft.submit train --config PARAMS [nft train options]", file=sys.stderr)
        return 2
    try:
        study = load_study(argv[argv.index("--config") + 1])["plan"].study
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"nft slurm: error: {e}", file=sys.stderr)
        return 2
    if study.slurm is None:
        print("nft slurm: error: study.slurm: not set in the params file", file=sys.stderr)
        return 2
    return submit(study.slurm, argv)


if __name__ == "__main__":
    sys.exit(main())
