"""``python -m engine.registry <command>``: register, promote, rollback, list, show, diff, delete.

Every command takes ``--storage URL`` (or ``registry.storage=URL``) and ``--store FOLDER`` (or
``registry.store=FOLDER``); see location.py for the defaults and the environment variables. A
request that cannot be done (an unknown model, version or alias, a run dir that cannot be
registered, a malformed reference, a password on the command line) prints ``error: ...`` on
stderr and exits with code 2; nothing in the registry changes then.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

import engine.registry.api as api
import engine.registry.db as db
from engine.redact import mask
from engine.registry.refs import RegistryError, check_alias, check_name, parse

COMMANDS = ("register", "promote", "rollback", "list", "show", "diff", "delete")
# The key=value spelling of the two location options, as the engine's other commands take them.
_KEY_OPTIONS = {"registry.storage": "--storage", "registry.store": "--store"}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage",
        help="database URL or SQLite file (no passwords: use the "
        "environment variable ENGINE_REGISTRY_STORAGE)",
    )
    common.add_argument("--store", help="folder of the registry's files")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(
        prog="python -m engine.registry", description="Versions, lineage and aliases of models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="|".join(COMMANDS))
    p = sub.add_parser("register", parents=[common], help="record a run dir as a new version")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True, help="model name, e.g. digits-mlp")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a file")
    p = sub.add_parser("promote", parents=[common], help="point an alias at a version")
    p.add_argument("ref", help="name@version")
    p.add_argument("--alias", required=True, help="e.g. production or staging")
    p = sub.add_parser("rollback", parents=[common], help="move an alias back one step")
    p.add_argument("name")
    p.add_argument("--alias", required=True)
    sub.add_parser("list", parents=[common, as_json], help="models, versions and aliases")
    p = sub.add_parser("show", parents=[common, as_json], help="one version and its lineage")
    p.add_argument("ref", help="name, name@version or name@alias")
    p = sub.add_parser("diff", parents=[common, as_json], help="two versions side by side")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("delete", parents=[common], help="delete a version no alias points at")
    p.add_argument("ref", help="name@version")
    return parser


def _key_options(argv: list[str]) -> list[str]:
    """``registry.storage=URL`` -> ``--storage URL`` (likewise ``registry.store=``)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out += [_KEY_OPTIONS[key], value] if eq and key in _KEY_OPTIONS else [arg]
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = [header, *rows]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in lines]


def _headline(v: db.Version) -> list[str]:
    """The version's monitored metric and its test/ counterpart."""
    monitor = v.lineage.get("monitor", "")
    test = "test/" + monitor.split("/", 1)[-1]
    return [monitor, test]


def _event_line(name: str, e: db.AliasEvent) -> str:
    was = f" (was {name}@{e.previous})" if e.previous is not None else ""
    return f"{e.at}  {e.action:<8}  @{e.alias} -> {name}@{e.version}{was}  by {e.by}"


# --------------------------------------------------------------------------------------------
# commands


def cmd_register(reg: api.Registry, args: argparse.Namespace) -> int:
    v = api.register(reg, args.run_dir, args.name, args.checkpoint)
    scores = ", ".join(
        f"{k} {_fmt(v.lineage['metrics'].get(k))}"
        for k in _headline(v)
        if k in v.lineage["metrics"]
    )
    print(f"registered {v.ref}" + (f" ({scores})" if scores else ""))
    print(f"  checkpoint sha256 {v.lineage['checkpoint']['sha256']}, files in {v.store}")
    print(f"  promote it: python -m engine.registry promote {v.ref} --alias production")
    return 0


def cmd_promote(reg: api.Registry, args: argparse.Namespace) -> int:
    ref = parse(args.ref)
    alias = check_alias(args.alias)
    number, previous = db.promote(reg.engine, ref, alias)
    was = f" (was {ref.name}@{previous})" if previous is not None else ""
    print(f"{ref.name}@{alias} -> {ref.name}@{number}{was}")
    return 0


def cmd_rollback(reg: api.Registry, args: argparse.Namespace) -> int:
    name, alias = check_name(args.name), check_alias(args.alias)
    old, new = db.rollback(reg.engine, name, alias)
    print(f"{name}@{alias} -> {name}@{new} (rolled back from {name}@{old})")
    return 0


def _listing(reg: api.Registry) -> list[dict[str, Any]]:
    out = []
    for name in db.model_names(reg.engine):
        versions = db.model_versions(reg.engine, name)
        aliases = {a: v.version for v in versions for a in v.aliases}
        out.append(
            {
                "name": name,
                "aliases": dict(sorted(aliases.items())),
                "versions": [
                    {
                        "version": v.version,
                        "created_at": v.created_at,
                        "created_by": v.created_by,
                        "aliases": v.aliases,
                        "metrics": {k: v.lineage["metrics"].get(k) for k in _headline(v)},
                    }
                    for v in versions
                ],
            }
        )
    return out


def cmd_list(reg: api.Registry, args: argparse.Namespace) -> int:
    listing = _listing(reg)
    if args.json:
        print(json.dumps({"models": listing}, indent=2))
        return 0
    if not listing:
        print(
            "no model is registered yet: python -m engine.registry register <run dir> --name <name>"
        )
    for model in listing:
        aliases = ", ".join(f"@{a} -> {v}" for a, v in model["aliases"].items()) or "none"
        print(f"{model['name']}  ({len(model['versions'])} versions; aliases: {aliases})")
        keys = sorted({k for v in model["versions"] for k in v["metrics"] if k})
        rows = [
            [str(v["version"]), v["created_at"], v["created_by"]]
            + [_fmt(v["metrics"].get(k)) for k in keys]
            + [" ".join(f"@{a}" for a in v["aliases"])]
            for v in model["versions"]
        ]
        print("\n".join(_table(["version", "created (UTC)", "by", *keys, "aliases"], rows)))
    return 0


def _shown(reg: api.Registry, v: db.Version) -> dict[str, Any]:
    record = asdict(v)
    record["history"] = [asdict(e) for e in db.history(reg.engine, v.name)]
    return record


def cmd_show(reg: api.Registry, args: argparse.Namespace) -> int:
    v = db.resolve(reg.engine, parse(args.ref))
    if args.json:
        print(json.dumps(_shown(reg, v), indent=2))
        return 0
    lin = v.lineage
    git = lin.get("git")
    ref_info = lin.get("reference") or {}
    facts = [
        ["aliases", " ".join(f"@{a}" for a in v.aliases) or "-"],
        ["registered", f"{v.created_at} by {v.created_by}"],
        ["run dir", lin.get("run_dir", "-")],
        ["checkpoint", f"{lin['checkpoint']['which']} sha256 {lin['checkpoint']['sha256']}"],
        ["data", f"fingerprint {lin.get('data_fingerprint') or '- (no data card)'}"],
        ["git", f"{git['commit']}{' (dirty tree)' if git['dirty'] else ''}" if git else "-"],
        ["init from", lin.get("init_from") or "-"],
        [
            "reference",
            f"{ref_info['rows']} training rows"
            if ref_info.get("rows")
            else f"none: {ref_info.get('reason', '-')}",
        ],
        ["store", v.store],
    ]
    print(v.ref)
    print("\n".join(f"  {k:<11} {value}" for k, value in facts))
    print("metrics")
    print("\n".join(f"  {k:<24} {_fmt(x)}" for k, x in sorted(lin.get("metrics", {}).items())))
    for name, values in lin.get("eval", {}).items():
        print(f"evaluation {name}")
        print("\n".join(f"  {k:<24} {_fmt(x)}" for k, x in sorted(values.items())))
    events = db.history(reg.engine, v.name)
    print("alias history" + ("" if events else ": none"))
    print("\n".join(f"  {_event_line(v.name, e)}" for e in events))
    return 0


def _diff_rows(a: db.Version, b: db.Version) -> dict[str, dict[str, list[Any]]]:
    from engine.tb import flatten

    def sides(x: dict[str, Any], y: dict[str, Any]) -> dict[str, list[Any]]:
        return {k: [x.get(k), y.get(k)] for k in sorted({*x, *y}) if x.get(k) != y.get(k)}

    def evals(v: db.Version) -> dict[str, Any]:
        return {
            f"{n}/{k}": x
            for n, values in v.lineage.get("eval", {}).items()
            for k, x in values.items()
        }

    def facts(v: db.Version) -> dict[str, Any]:
        lin, git = v.lineage, v.lineage.get("git") or {}
        return {
            "checkpoint sha256": lin["checkpoint"]["sha256"],
            "data fingerprint": lin.get("data_fingerprint"),
            "git commit": git.get("commit"),
            "init from": lin.get("init_from"),
        }

    return {
        "lineage": sides(facts(a), facts(b)),
        "config": sides(flatten(a.lineage["config"]), flatten(b.lineage["config"])),
        "metrics": sides(a.lineage.get("metrics", {}), b.lineage.get("metrics", {})),
        "eval": sides(evals(a), evals(b)),
    }


def cmd_diff(reg: api.Registry, args: argparse.Namespace) -> int:
    a, b = (db.resolve(reg.engine, parse(r)) for r in (args.a, args.b))
    diff = _diff_rows(a, b)
    if args.json:
        print(json.dumps({"a": a.ref, "b": b.ref, **diff}, indent=2))
        return 0
    if not any(diff.values()):
        print(f"{a.ref} and {b.ref} have the same config, lineage and metrics")
        return 0
    for section, rows in diff.items():
        if rows:
            print(section)
            table = [[k, _fmt(x), _fmt(y)] for k, (x, y) in rows.items()]
            print("\n".join(_table(["key", a.ref, b.ref], table)))
    return 0


def cmd_delete(reg: api.Registry, args: argparse.Namespace) -> int:
    ref = parse(args.ref)
    number = db.delete(reg.engine, ref)
    print(f"deleted {ref.name}@{number} (its number is not given out again)")
    return 0


HANDLERS = {name: globals()[f"cmd_{name}"] for name in COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_key_options(list(sys.argv[1:] if argv is None else argv)))
    try:
        with api.open_registry(args.storage, args.store) as reg:
            return HANDLERS[args.command](reg, args)
    except (RegistryError, *user_errors()) as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """What a user's input can cause (the registry's own refusals are ConfigErrors too)."""
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.dataset import DataError

    return (ConfigError, DataError, CheckpointError)
