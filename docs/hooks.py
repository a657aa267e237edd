"""MkDocs hooks: pages generated from the code, so that they cannot drift from it.

- `<!-- generated: config-reference -->` becomes a table per section of every runner config key
  (`keras_adascale.experiments.config.SCHEMA`): its default, what it accepts and what it means.
- `<!-- generated: cli-reference -->` becomes the `--help` of `keras-adascale` and of each command.
"""

import json
import os

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
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    parser = cli.parser()
    lines = ["## `keras-adascale`", "", "```text", parser.format_help().rstrip(), "```", ""]
    commands = next(action for action in parser._actions if action.choices and isinstance(action.choices, dict))
    for name, sub in commands.choices.items():
        lines += [f"## `keras-adascale {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


_GENERATED = {"config-reference": config_reference, "cli-reference": cli_reference}


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (MkDocs's hook signature)
    for name, make in _GENERATED.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
