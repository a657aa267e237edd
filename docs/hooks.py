"""Pages generated from the code, committed so that a reader of the repository sees them, and checked by
the MkDocs build (this file is its hook) and the tests, so that they cannot drift from the code.

- docs/runner/config.md: a table per section of every runner config key
  (`keras_adascale.experiments.config.SCHEMA`): its default, what it accepts and what it means.
- docs/runner/cli.md: the `--help` of `keras-adascale` and of each command.

Each page holds its generated part between `<!-- generated: NAME (...) -->` and `<!-- end generated: NAME -->`.
After changing the schema or the command line, run `python docs/hooks.py` to write them anew.
"""

import json
import os
import pathlib
import re
import sys

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


def cli_reference():
    # argparse wraps to the terminal width: a fixed one, for this call only. (Its layout also changes with
    # the Python version: the committed page is written on the one CI runs, 3.11.)
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _cli_reference()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _cli_reference():
    parser = cli.parser()
    lines = ["## `keras-adascale`", "", "```text", parser.format_help().rstrip(), "```", ""]
    commands = next(action for action in parser._actions if action.choices and isinstance(action.choices, dict))
    for name, sub in commands.choices.items():
        lines += [f"## `keras-adascale {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
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
