"""ckptctl: the operator CLI on ckptd's gRPC API, kubectl's way.

    ckptctl get checkpoints|jobs|agents|instances|all [NAME] [-o table|wide|json|yaml]
    ckptctl describe KIND NAME · delete KIND NAME · cancel JOB · watch JOB · status
    ckptctl push NAME VERSION PATH... · update NAME[@VERSION] --wait · register · join
    ckptctl completion bash|zsh|fish · health · --version

Shared options (`--addr`, `-o`, `--token-file`, `--tls-*`) go anywhere on the line. JSON and
YAML carry every field, 64-bit integers as numbers. Exit codes: 0 done, 1 a job failed (or
was cancelled), 2 usage, 3 ckptd refused or could not be reached (its gRPC status and
reason on stderr), 130 interrupted (the work goes on in ckptd; stderr says how to follow or
cancel it)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from ckpt_common.errors import CkptError
from ckptctl import actions, verbs  # noqa: F401  (they add their commands to cli)
from ckptctl.app import cli

EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=args, prog_name="ckptctl", obj={}, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:  # BadParameter, NoSuchOption, missing arguments
        e.show()
        return EXIT_USAGE
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except CkptError as e:  # ckptd's gRPC status
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # what was asked is malformed: a usage error
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (click.Abort, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
