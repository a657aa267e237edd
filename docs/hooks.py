"""Pages generated from the code, committed so that a reader of the repository sees them, and checked by
the MkDocs build (this file is its hook) and the tests, so that they cannot drift from the code.

- docs/runner/config.md: a table per section of every runner config key
  (`keras_adascale.experiments.config.SCHEMA`): its default, what it accepts and what it means.
- docs/runner/cli.md: the `--help` of `keras-adascale` and of each command.

Each page holds its generated part between `<!-- generated: NAME (...) -->` and `<!-- end generated: NAME -->`.
After changing the schema or the command line, run `python docs/hooks.py` to write them anew.
"""

import argparse
import json
import os
import pathlib
import re
import sys
import textwrap

from keras_adascale.experiments import cli, config


def _cell(text, code=False):
    text = str(text).replace("|", "\\|").replace("\n", " ")
    if code:
        return f"`{text}`"
    # Markdown would read <key> as a tag, and attr_list a trailing {...} (the runs key's example) as
    # HTML attributes.
    for character, entity in (("<", "&lt;"), (">", "&gt;"), ("{", "&#123;"), ("}", "&#125;")):
        text = text.replace(character, entity)
    return text


def _accepts(key):
    kind = config._KIND_NAMES.get(key.kind, "any value")
    parts = [f"one of {', '.join(f'`{c}`' for c in key.choices)}" if key.choices else kind]
    if key.minimum is not None:
        parts.append(f"at least {key.minimum:g}")
    if key.nullable:
        parts.append("or `null`")
    return ", ".join(parts)


def config_reference():
    lines = []

    def table(entries, prefix):
        rows = ["| Key | Default | Accepts | Meaning |", "|---|---|---|---|"]
        for name, key in entries:
            rows.append(f"| `{prefix}{name}` | {_cell(json.dumps(key.default), code=True)} | {_cell(_accepts(key))} "
                        f"| {_cell(key.help)} |")
        return rows

    top = [(name, entry) for name, entry in config.SCHEMA.items() if not config._is_section(entry)]
    lines += ["## Top level", "", '<div class="config-reference" markdown>', "", *table(top, ""), "", "</div>", ""]
    for section, entries in config.SCHEMA.items():
        if config._is_section(entries):
            lines += [f"## `{section}`", "", '<div class="config-reference" markdown>', "",
                      *table(entries.items(), f"{section}."), "", "</div>", ""]
    return "\n".join(lines)


# The `--help` text is written here from the parser's actions, not by argparse's `format_help`, whose layout
# changes with the Python version (3.13 and 3.14 rework the usage and option lines, 3.14 adds color) and the
# terminal width: this page is the same on every Python. It keeps argparse's 3.10-3.12 layout at 100 columns.
_WIDTH = 98  # argparse's: the terminal's 100 columns less 2
_HELP_COLUMN = 24  # argparse's max_help_position


def _invocation(action):
    """How an argument is written in the argument list: `--set KEY=VALUE`, `config`, `RUN_DIR`."""
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"{option} {metavar}" for option in action.option_strings)


def _in_usage(action):
    """How an argument is written in the usage line: `[--only RUN[,RUN...]]`, `RUN_DIR [RUN_DIR ...]`."""
    if action.nargs not in (None, 0, "+", argparse.PARSER, argparse.REMAINDER):
        raise ValueError(f"docs/hooks.py writes no usage for nargs={action.nargs!r} ({action.dest}): add it")
    if not action.option_strings:
        name = action.metavar or action.dest
        if isinstance(action, argparse._SubParsersAction):
            return "{" + ",".join(action.choices) + "} ..."
        if action.nargs == argparse.REMAINDER:
            return f"{name} ..."
        return f"{name} [{name} ...]" if action.nargs == "+" else name
    option = action.option_strings[0]
    text = option if action.nargs == 0 else f"{option} {action.metavar or action.dest.upper()}"
    return text if action.required else f"[{text}]"


def _usage(parser, prog):
    prefix = f"usage: {prog} "
    shown = [action for action in parser._actions if action.help != argparse.SUPPRESS]
    optionals = [_in_usage(action) for action in shown if action.option_strings]
    positionals = [_in_usage(action) for action in shown if not action.option_strings]
    line = prefix + " ".join(optionals + positionals)
    if len(line) <= _WIDTH:
        return [line]
    indent = " " * len(prefix)  # too long: the options wrapped, then the positionals on lines of their own
    lines = []
    for parts in (optionals, positionals):
        current = None
        for part in parts:
            if current is not None and len(current) + 1 + len(part) > _WIDTH:
                lines.append(current)
                current = None
            current = (indent + part) if current is None else f"{current} {part}"
        if current is not None:
            lines.append(current)
    lines[0] = prefix + lines[0][len(indent):]
    return lines


def _argument_lines(invocation, text, column):
    """One argument as argparse lists it: its help from `column` on, wrapped, or on the next lines."""
    wrapped = textwrap.wrap(" ".join(text.split()), _WIDTH - column) if text else []
    if not wrapped:
        return [invocation]
    if len(invocation) + 2 <= column:
        lines = [invocation.ljust(column) + wrapped[0]]
        wrapped = wrapped[1:]
    else:
        lines = [invocation]
    return lines + [" " * column + line for line in wrapped]


def _help(action, prog):
    return action.help % {**vars(action), "prog": prog} if action.help else ""


def _text(text, raw):
    if raw:
        return text.strip("\n").splitlines()
    return textwrap.wrap(" ".join(text.split()), _WIDTH)


def _help_page(parser, prog):
    """The `--help` of `parser`, as argparse's 3.10-3.12 layout writes it at 100 columns."""
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    lines = _usage(parser, prog) + [""]
    if parser.description:
        lines += _text(parser.description, raw) + [""]
    rows = {"positional arguments:": [], "options:": []}
    for action in (action for action in parser._actions if action.help != argparse.SUPPRESS):
        section = rows["options:" if action.option_strings else "positional arguments:"]
        if isinstance(action, argparse._SubParsersAction):
            section.append(("  {" + ",".join(action.choices) + "}", _help(action, prog)))
            section += [(f"    {choice.dest}", _help(choice, prog)) for choice in action._choices_actions]
        else:
            section.append((f"  {_invocation(action)}", _help(action, prog)))
    # One help column for both lists, as argparse aligns every argument of a parser.
    column = min(max(len(invocation) for section in rows.values() for invocation, _ in section) + 2,
                 _HELP_COLUMN)
    for title, section in rows.items():
        if section:
            lines.append(title)
            for invocation, text in section:
                lines += _argument_lines(invocation, text, column)
            lines.append("")
    if parser.epilog:
        lines += _text(parser.epilog, raw) + [""]
    return "\n".join(lines).rstrip()


def cli_reference():
    parser = cli.parser()
    lines = ["## `keras-adascale`", "", "```text", _help_page(parser, parser.prog), "```", ""]
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        lines += [f"## `keras-adascale {name}`", "", "```text", _help_page(sub, f"{parser.prog} {name}"), "```", ""]
    return "\n".join(lines)


DOCS = pathlib.Path(__file__).resolve().parent
# page (relative to docs/) -> (name, the function that writes its generated part)
GENERATED = {"runner/config.md": ("config-reference", config_reference),
             "runner/cli.md": ("cli-reference", cli_reference)}
_COMMAND = "python docs/hooks.py"


def _section(name):
    return re.compile(rf"(<!-- generated: {name} [^>]*-->\n)(.*?)(<!-- end generated: {name} -->)", re.S)


def regenerated(text, name, make):
    """`text` with its generated part `name` written anew (ValueError if it has none)."""
    section = _section(name)
    if not section.search(text):
        raise ValueError(f"no '<!-- generated: {name} ... -->' ... '<!-- end generated: {name} -->' section")
    return section.sub(lambda match: f"{match[1]}\n{make()}\n{match[3]}", text, count=1)


def stale_pages():
    """The generated pages whose committed text differs from what the code generates now."""
    stale = []
    for page, (name, make) in GENERATED.items():
        text = (DOCS / page).read_text()
        if regenerated(text, name, make) != text:
            stale.append(page)
    return stale


def write_pages():
    """Writes every generated part anew; returns the pages that changed."""
    changed = []
    for page, (name, make) in GENERATED.items():
        path = DOCS / page
        text = path.read_text()
        new = regenerated(text, name, make)
        if new != text:
            path.write_text(new)
            changed.append(page)
    return changed


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (MkDocs's hook signature)
    entry = GENERATED.get(page.file.src_uri)
    if entry is not None and regenerated(markdown, *entry) != markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{page.file.src_uri} is out of date with the code: run `{_COMMAND}`.")
    return markdown


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    written = write_pages()
    print("\n".join(f"wrote docs/{page}" for page in written) or "up to date", file=sys.stdout)
