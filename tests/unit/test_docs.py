"""The README keeps its promises about configuration: every environment variable the
product reads or sets is in it, and every ckptd flag is settable by environment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["ckpt_common", "ckpt_daemon", "ckpt_agent", "vllm_ext", "ckptctl", "ckpt_trainer"]
# a string literal naming a variable of ours or of a library the product configures
ENV_NAME = re.compile(r"[\"']((?:CKPTD?|MC|NCCL|TORCH_NCCL|OTEL|VLLM)_[A-Z0-9_]+)[\"']")
PREFIXES = {"CKPTD_", "CKPT_"}  # prefixes handed to envflags, not variables


def product_env_names() -> set[str]:
    names: set[str] = set()
    for pkg in PRODUCT:
        for f in (ROOT / pkg).rglob("*.py"):
            names.update(ENV_NAME.findall(f.read_text()))
    return names - PREFIXES


def test_every_environment_variable_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    names = product_env_names()
    assert len(names) > 15, names  # the scan sees them
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"not in README's environment table: {missing}"


def test_every_daemon_flag_is_settable_by_environment(monkeypatch) -> None:
    from ckpt_daemon.main import parse_args

    monkeypatch.setenv("CKPTD_DRAIN_S", "7.5")
    monkeypatch.setenv("CKPTD_METRICS_LISTEN", "127.0.0.1:9999")
    cfg = parse_args([])
    assert cfg.drain_s == 7.5 and cfg.metrics_listen == "127.0.0.1:9999"
    assert parse_args(["--drain-s", "3"]).drain_s == 3  # the flag wins


def readme_ckptctl_lines() -> list[str]:
    """Every `ckptctl ...` command line in the README's shell blocks."""
    out, fence = [], ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = "" if fence else (line[3:].strip() or "text")
        elif fence in ("sh", "bash", "console") and line.strip().startswith("ckptctl "):
            out.append(line.strip())
    return out


def test_readme_ckptctl_commands_parse() -> None:
    """What the README shows, ckptctl accepts as written (parsed, not run: no server)."""
    import shlex

    from ckptctl.cli import cli

    lines = readme_ckptctl_lines()
    assert len(lines) >= 5, lines
    for line in lines:
        args = shlex.split(line.split(" #")[0])[1:]
        ctx = cli.make_context("ckptctl", args)
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, sub_args = cli.resolve_command(ctx, rest)
        assert cmd is not None, line
        cmd.make_context(name or "", sub_args, parent=ctx)  # raises on what it does not take


def test_every_ckptctl_option_has_help() -> None:
    import click

    from ckptctl.cli import cli

    missing = [
        f"{name} {opt.opts[0]}"
        for name, cmd in cli.commands.items()
        for opt in cmd.params
        if isinstance(opt, click.Option) and not opt.help and opt.name != "help"
    ]
    assert not missing, missing
    assert all(cmd.help for cmd in cli.commands.values())
