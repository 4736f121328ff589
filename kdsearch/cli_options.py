"""How the command line is derived from the declarations, and where field names become flags.

Each knob of a section a command lists is one option: its flag (``flag``), its help, its default
and, for choices, the list in its metavar. click converts the text (a number, a path); the knob
checks the value when the command builds its section, so a value has one validator and one
wording whether it came from a flag, a file or a study. A field error raised anywhere below the
command line (``ConfigError``) is said here, once: as the command's flag (``--val-size``), or as
the file key when the value came from a config file (``say_as``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click
from click.core import ParameterSource

from kdsearch.errors import ConfigError, Interrupted, Terminated, UserError, speak
from kdsearch.knobs import Knob, default_of, knobs_of

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
# Where a command keeps the words for fields a config file set (ctx.meta), so errors say the file's key.
WORDS = "kdsearch.words"


def flag(name: str) -> str:
    """The command-line option of a field: the one mapping from field names to flags."""
    return "--" + name.replace("_", "-")


def _click_type(rule: Knob) -> click.ParamType:
    """What click converts the text to; the knob, not click, then checks the value's range."""
    if rule.path is not None:
        return click.Path(dir_okay=rule.path != "file", file_okay=rule.path != "dir")
    return {int: click.INT, float: click.FLOAT}.get(rule.kind, click.STRING)


def knob_option(name: str, rule: Knob, default: Any, *, required: bool = False) -> Decorator:
    """The click option of one knob: its flag, type, default and help from the declaration."""
    names = [*([rule.short] if rule.short else []), flag(name)]
    kwargs: dict[str, Any] = {"default": default, "help": speak(rule.help, flag), "envvar": rule.envvar}
    if rule.kind is bool:
        if default:
            names[-1] += "/--no-" + flag(name).removeprefix("--")
        return click.option(*names, name, is_flag=True, **kwargs)
    if rule.kind is tuple:
        return click.option(*names, name, multiple=True, metavar="NAME=VALUE", **kwargs)
    kwargs |= {"type": _click_type(rule), "show_default": default is not None, "required": required}
    if rule.choices is not None:
        kwargs["metavar"] = "[" + "|".join(map(str, rule.choices)) + "]"
    return click.option(*names, name, **kwargs)


def options(
    *sections: type,
    defaults: Mapping[str, Any] | None = None,
    required: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
) -> Decorator:
    """One option per knob of ``sections``, in declaration order.

    ``defaults`` overrides a declared default for this command, ``required`` makes an option one
    the user must give (a field without a default always is), ``drop`` leaves knobs out.
    """
    overrides = dict(defaults or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for section in reversed(sections):
            for name, rule in reversed(list(knobs_of(section))):
                if name in drop:
                    continue
                default = None if name in required else overrides.get(name, default_of(section, name))
                must = name in required or (default is None and not rule.optional)
                fn = knob_option(name, rule, default, required=must)(fn)
        return fn

    return decorate


def build(section: type, values: Mapping[str, Any], **parts: Any) -> Any:
    """A section from option values by field name (``parts``: its sub-sections); the knobs check them."""
    return section(**{name: values[name] for name, _ in knobs_of(section) if name in values}, **parts)


def words(ctx: click.Context | None) -> Callable[[str], str]:
    """How this invocation says a field: a config file's key if the file set it, else the command's flag."""
    if ctx is None:
        return lambda name: name
    said: dict[str, str] = ctx.meta.get(WORDS, {})
    options = {param.name for param in ctx.command.params}
    return lambda name: said.get(name) or (flag(name) if name in options else name)


def say_as(ctx: click.Context, names: Mapping[str, str]) -> None:
    """Say these fields as given here (``config best.yaml: data.val_size``), not as flags."""
    ctx.meta.setdefault(WORDS, {}).update(names)


def given_on_command_line(ctx: click.Context, names: list[str]) -> list[str]:
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [name for name in names if ctx.get_parameter_source(name) in sources]


class Command(click.Command):
    """A command whose field errors, wherever they are raised, are said in the user's words."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise UserError(exc.say(words(ctx))) from None
        except KeyboardInterrupt as exc:
            # click's own handler would print an empty line before our "kdsearch: interrupted"
            raise Interrupted(isinstance(exc, Terminated)) from None


class Group(click.Group):
    """The ``kdsearch`` group: every command is a ``Command``."""

    command_class = Command
