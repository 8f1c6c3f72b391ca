"""Read a policy directory and compile it into an immutable :class:`Snapshot`.

``gateway policy check``, ``policy test``, start-up and hot reload all go through
:func:`compile_sources`, so they accept and reject exactly the same policies.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy.builtin_actions import BUILTIN_DENY, DenyResponse, default_registry, parse_deny
from gateway.policy.evaluate import CompiledRule, RuleIndex, Snapshot
from gateway.policy.matchers import ALWAYS, AllOf, Cond, ConditionCompiler, Leaf, build_predicate
from gateway.policy.registry import CompileEnv, MatchedAction, Registry
from gateway.policy.schema import NamedList, PolicyFile, RuleDef, SettingsDef, parse_file
from gateway.policy.testing import TestCase, parse_tests
from gateway.policy.textfile import read_utf8
from gateway.stages.client_ip import nat64_of
from gateway.yamlsource import ConfigError, Issue, Issues, Mark, _issue_order

# Index on the most selective field a rule constrains: one account or model narrows far more
# than a tier or an API family.
INDEX_PRIORITY = (
    "principal.account", "principal.key_id", "principal.org", "request.model", "client.country",
    "client.registered_country", "client.asn", "principal.tier", "request.route", "request.path",
    "principal.source", "request.api", "request.method",
)

NO_POLICY_FILES = ("no policy files (*.yaml, *.yml), expected at least one; a set meant to allow every "
                   "request says so in a file holding 'version: 1'")


@dataclass(frozen=True, slots=True)
class Source:
    """One policy file's text; ``name`` is its path relative to the policy directory."""

    name: str
    text: str


def read_policy_dir(directory: str | os.PathLike[str]) -> list[Source]:
    """All ``*.yaml``/``*.yml`` files below ``directory`` (hidden ones skipped), in path order.

    Raises :class:`ConfigError` naming every file that cannot be read as UTF-8 text (a broken
    symlink, a symlink loop, a permission problem, a stray byte) and when there is no policy file at all: an
    empty set would go live as "allow everything", which is never what an emptied or mis-synced
    directory means.
    """
    root = Path(directory)
    if not root.is_dir():
        what = "symbolic link loop" if _is_loop(root) else "policy directory not found"
        raise ConfigError([Issue(Mark(str(root), 1, 1), "", f"{what}, expected a directory")])
    found: list[Source] = []
    problems: list[Issue] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        # Editors and deploy tools leave dot-files (swap files, atomic-rename temporaries).
        if any(part.startswith(".") for part in rel.parts) or path.suffix not in (".yaml", ".yml"):
            continue
        name = rel.as_posix()
        # One stat (following links) tells a loop, a dangling link and a permission problem
        # apart; Path.exists() folds them all into False.
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            problems.append(Issue(Mark(name, 1, 1), "", _unreadable(path, exc)))
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            problems.append(Issue(Mark(name, 1, 1), "", "not a regular file, expected a policy file"))
        else:
            try:
                found.append(Source(name, read_utf8(path, name)))
            except ConfigError as exc:
                problems.extend(exc.issues)
    if problems:
        raise ConfigError(problems)
    if not found:
        raise ConfigError([Issue(Mark(str(root), 1, 1), "", NO_POLICY_FILES)])
    return found


def _is_loop(path: Path) -> bool:
    """Whether resolving ``path`` runs into a symlink cycle (ELOOP)."""
    try:
        path.stat()
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _unreadable(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be stat'ed, in the words an operator would search for."""
    if exc.errno == errno.ELOOP:
        # a -> b -> a (or a longer cycle): distinct from a dangling link, whose fix is to restore
        # the target rather than to break the cycle.
        try:
            via = f"it points to '{os.readlink(path)}', which never resolves to a file"
        except OSError:
            via = "it never resolves to a file"
        return f"symbolic link loop ({via}), expected a policy file"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and path.is_symlink():
        return "broken symbolic link (its target does not exist), expected a policy file"
    # Permission denied, or a file removed between listing and reading (a sync in progress).
    return f"cannot read ({exc.strerror or exc}), expected a policy file"


def revision_of(sources: Sequence[Source]) -> str:
    """Content hash of the policy set: names and texts, so a rename is a new revision too."""
    digest = hashlib.sha256()
    for source in sorted(sources, key=lambda s: s.name):
        digest.update(source.name.encode() + b"\0" + source.text.encode() + b"\0")
    return digest.hexdigest()[:16]


def load_policy_dir(directory: str | os.PathLike[str], registry: Registry | None = None,
                    settings: Any = None) -> Snapshot:
    """Read and compile ``directory``; raise :class:`ConfigError` listing every error."""
    snapshot, issues = compile_sources(read_policy_dir(directory), registry, settings)
    if snapshot is None:
        raise ConfigError([i for i in issues if i.severity == "error"])
    return snapshot


def compile_sources(sources: Sequence[Source], registry: Registry | None = None,
                    settings: Any = None) -> tuple[Snapshot | None, list[Issue]]:
    """Compile a policy set; returns (snapshot or None on errors, every error and warning)."""
    registry = registry or default_registry()
    issues = Issues()
    if not sources:
        issues.error(Mark("<policy set>", 1, 1), "", NO_POLICY_FILES)
    names = frozenset(registry.actions)
    files = [f for s in sorted(sources, key=lambda s: s.name)
             if (f := parse_file(s.name, s.text, names, issues)) is not None]
    conf = _settings(files, issues)
    lists = _lists(files, issues)
    env = CompileEnv({n.name: tuple(str(v) for v in n.values) for n in lists.values()}, settings)
    default_deny = BUILTIN_DENY
    if conf.deny is not None:
        parsed = parse_deny(conf.deny)
        default_deny = parsed.over(BUILTIN_DENY) if parsed else BUILTIN_DENY
    conditions = ConditionCompiler(lists, registry, env)
    rules: list[CompiledRule] = []
    seen: dict[str, Mark] = {}
    for file in files:
        for rule in file.rules:
            if rule.id in seen:
                issues.error(rule.mark, f"{rule.path}.id",
                             f"duplicate rule id '{rule.id}', first defined at {seen[rule.id]}")
                continue
            seen[rule.id] = rule.mark
            compiled = _rule(rule, len(rules), conf, default_deny, conditions, registry, env)
            if compiled is not None:
                rules.append(compiled)
    _warn_unreachable(rules, files, issues)
    for named in lists.values():
        # Only on an otherwise valid set: a failed reference would also look like "never used".
        if named.name not in conditions.used_lists and not issues.errors:
            issues.warning(named.mark, f"lists.{named.kind}.{named.name}",
                           f"list '{named.name}' is never used")
    tests: list[TestCase] = []
    for file in files:
        if file.tests is not None:
            tests.extend(parse_tests(file.tests, set(seen), names, nat64_of(settings)))
    ordered = sorted(issues.items, key=_issue_order)
    if issues.errors:
        return None, ordered
    snapshot = Snapshot(
        revision=revision_of(sources), rules=tuple(rules), index=build_index(rules),
        default_decision=conf.default, default_deny=default_deny, mode=conf.mode, lists=lists,
        files=tuple(f.name for f in files), warnings=tuple(i for i in ordered if i.severity == "warning"),
        tests=tuple(tests), enforced_rules=frozenset(r.id for r in rules if not r.shadow),
    )
    return snapshot, ordered


def _settings(files: list[PolicyFile], issues: Issues) -> SettingsDef:
    found = [f.settings for f in files if f.settings is not None]
    for extra in found[1:]:
        issues.error(extra.mark, "settings", f"settings are already defined at {found[0].mark}, "
                     "expected one settings block per policy set")
    return found[0] if found else SettingsDef("allow", "enforce", None, Mark("<defaults>", 1, 1))


def _lists(files: list[PolicyFile], issues: Issues) -> dict[str, NamedList]:
    out: dict[str, NamedList] = {}
    for file in files:
        for named in file.lists:
            if named.name in out:
                issues.error(named.mark, f"lists.{named.kind}.{named.name}",
                             f"duplicate list name '{named.name}', first defined at {out[named.name].mark}")
                continue
            out[named.name] = named
    return out


def _rule(rule: RuleDef, pos: int, conf: SettingsDef, default_deny: DenyResponse,
          conditions: ConditionCompiler, registry: Registry, env: CompileEnv) -> CompiledRule | None:
    cond: Cond | None = ALWAYS if rule.when is None else conditions.compile(rule.when)
    shadow = (rule.mode or conf.mode) == "shadow"
    terminal: tuple[str, Any] | None = None
    actions: list[MatchedAction] = []
    tags: tuple[str, ...] = ()
    ok = cond is not None
    for name, node in rule.actions:
        spec = registry.actions[name]
        value = spec.parse(node, env)
        if value is None:
            ok = False
            continue
        if spec.terminal:
            if terminal is not None:
                node.error(f"rule already ends with '{terminal[0]}', expected at most one terminal action")
                ok = False
            terminal = (name, value)
            if name in ("allow", "deny"):
                continue  # built-in decisions are carried by Outcome.decision, not as actions
        if name == "tag":
            tags = tuple(value)
        actions.append(MatchedAction(rule.id, name, value, shadow))
    if not ok or cond is None:
        return None
    deny = terminal[1].over(default_deny) if terminal and terminal[0] == "deny" else None
    leaf = _index_leaf(cond)
    residual: Cond = cond
    if leaf is cond:
        residual = ALWAYS
    elif leaf is not None and isinstance(cond, AllOf):
        residual = AllOf(tuple(x for x in cond.items if x is not leaf))
    return CompiledRule(
        pos, rule.id, rule.description, rule.file, rule.mark, shadow, cond, build_predicate(cond),
        build_predicate(residual), leaf,
        terminal[0] if terminal else None, terminal[1] if terminal else None, tuple(actions), tags, deny,
    )


def _warn_unreachable(rules: list[CompiledRule], files: list[PolicyFile], issues: Issues) -> None:
    paths = {r.id: r.path for f in files for r in f.rules}
    catch_all: CompiledRule | None = None
    for rule in rules:
        if catch_all is not None:
            issues.warning(rule.mark, paths.get(rule.id, ""),
                           f"rule '{rule.id}' is unreachable: rule '{catch_all.id}' at {catch_all.mark} "
                           "matches every request and ends evaluation")
        elif rule.cond == ALWAYS and rule.terminal is not None and not rule.shadow:
            catch_all = rule


def _index_leaf(cond: Cond) -> Leaf | None:
    leaves = [cond] if isinstance(cond, Leaf) else list(cond.items) if isinstance(cond, AllOf) else []
    usable = [x for x in leaves if isinstance(x, Leaf) and x.field.indexable
              and x.matcher.index_values is not None and x.field.path in INDEX_PRIORITY]
    return min(usable, key=lambda x: INDEX_PRIORITY.index(x.field.path), default=None)


def build_index(rules: Sequence[CompiledRule]) -> RuleIndex:
    """File every rule under its most selective equality/in condition (see :class:`RuleIndex`)."""
    always: list[int] = []
    buckets: dict[str, dict[Any, list[int]]] = {}
    getters: dict[str, Any] = {}
    for rule in rules:
        leaf = rule.index_leaf
        if leaf is None or leaf.matcher.index_values is None:
            always.append(rule.pos)
            continue
        getters[leaf.field.path] = leaf.field.getter
        table = buckets.setdefault(leaf.field.path, {})
        for value in leaf.matcher.index_values:
            table.setdefault(value, []).append(rule.pos)
    fields = tuple(
        (path, getters[path], {k: tuple(v) for k, v in buckets[path].items()})
        for path in INDEX_PRIORITY if path in buckets
    )
    return RuleIndex(tuple(always), fields)
